"""Vision-language model backends that write one caption per image for the SID captioner.

- `OpenAIBackend`: any OpenAI-compatible chat-completions server with image input (hosted
  GPT-4-class models, Ollama, LM Studio, vLLM, llama.cpp server). Standard library only. The API
  key is read from an environment variable whose *name* is given; the key itself is never kept
  on the backend, never put into messages, errors, captions or files.
- `LocalBackend`: a transformers vision-language model from a folder of the `LLM` model kind,
  loaded offline (`local_files_only`, no remote code), run on the chosen device/dtype and
  unloaded after use.
- Manual captions need no backend (`engine.captions.sid` validates them the same way).
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .. import host
from ..errors import UnconfusedError

# The SID captioner's default model name on an OpenAI-compatible server: Ollama's Qwen2.5-VL (7B).
# The SID paper (sec. 3.2, tab. E.4) found LLaVA over-describes the subject and GPT-4V follows the
# instruction best; among models people run locally, Qwen2.5-VL follows such instructions best at a
# size a 12 GB card holds. docs/sid.md says why; any other name works.
DEFAULT_MODEL = "qwen2.5vl"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_KEYISH = re.compile(r"^(sk-|sk_|pk-|gsk_|hf_|xai-|AIza|Bearer\s)|^(?=.*[a-z])(?=.*[0-9])[A-Za-z0-9_\-]{24,}$")


def api_key_from_env(name: str) -> str | None:
    """The key held by environment variable `name`, or None when `name` is empty or unset.

    A value that looks like a key rather than a variable name is refused without echoing it."""
    name = (name or "").strip()
    if not name:
        return None
    if _KEYISH.search(name) or not _ENV_NAME.match(name):
        raise UnconfusedError("this must be the NAME of an environment variable that holds the key (e.g. "
                              "OPENAI_API_KEY), not the key itself: a key typed here would be saved in the "
                              "workflow. Set the variable before starting ComfyUI and write its name here", input="api_key_env")
    value = os.environ.get(name, "").strip()
    return value or None


def image_data_url(image: Image.Image, max_side: int = 1024) -> str:
    """The image as a JPEG data URL, its longer side at most `max_side` (what the server sees)."""
    img = image.convert("RGB")
    if max(img.size) > max_side > 0:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)  # no metadata of any kind is written
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_url(base_url: str) -> str:
    url = (base_url or "").strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise UnconfusedError(f"'{base_url}' is not an http(s) URL; give the server's OpenAI-compatible base URL, "
                              "e.g. http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:1234/v1 (LM Studio), "
                              "https://api.openai.com/v1", input="base_url")
    if "@" in url.split("//", 1)[1].split("/", 1)[0]:
        raise UnconfusedError("the URL contains user:password@ - put credentials into the api_key_env variable, "
                              "not into the URL (it is saved in the workflow)", input="base_url")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _scrub(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return text


@dataclass
class OpenAIBackend:
    base_url: str
    model: str
    api_key_env: str = ""
    timeout: float = 120.0
    retries: int = 4
    concurrency: int = 4
    max_tokens: int = 300
    temperature: float = 0.2
    max_image_side: int = 1024
    backoff: float = 1.0  # first wait; doubles each retry (plus jitter), capped at 60 s

    def __post_init__(self) -> None:
        self.url = chat_url(self.base_url)
        if not (self.model or "").strip():
            raise UnconfusedError("give the model name the server knows (e.g. gpt-4o, llava, qwen2.5vl)", input="model")
        if self.concurrency < 1 or self.retries < 0 or self.timeout <= 0:
            raise UnconfusedError("concurrency must be >= 1, retries >= 0 and timeout > 0",
                                  input="concurrency")
        api_key_from_env(self.api_key_env)  # checks the name now, reads the key per request

    def request_body(self, image: Image.Image, instruction: str) -> dict:
        return {
            "model": self.model.strip(),
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": instruction},
                {"type": "image_url", "image_url": {"url": image_data_url(image, self.max_image_side)}},
            ]}],
            "max_tokens": int(self.max_tokens),
            "temperature": float(self.temperature),
            "stream": False,
        }

    def _post(self, body: bytes, key: str | None) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "unconfused-sid-captioner"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener().open(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            try:
                data = e.read()
            except Exception:
                data = b""
            return e.code, dict(e.headers or {}), data

    def _opener(self) -> urllib.request.OpenerDirector:
        """A server on this machine is reached directly even when HTTP(S)_PROXY is set."""
        hostname = (urllib.parse.urlsplit(self.url).hostname or "").lower()
        if hostname in ("localhost", "::1") or hostname.startswith("127."):
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()

    def caption_one(self, image: Image.Image, instruction: str) -> str:
        """One caption; retries 429/5xx/timeouts with exponential backoff, raises UnconfusedError."""
        body = json.dumps(self.request_body(image, instruction)).encode()
        key = api_key_from_env(self.api_key_env)
        if key:
            parts = urllib.parse.urlsplit(self.url)
            loopback = (parts.hostname or "") in ("localhost", "::1") or (parts.hostname or "").startswith("127.")
            if parts.scheme != "https" and not loopback:
                raise UnconfusedError(f"refusing to send the key from {self.api_key_env.strip()} over plain http to "
                                      f"{parts.hostname}: use an https:// base_url, or clear api_key_env for a "
                                      "server that needs no key", input="base_url")
        last = ""
        for attempt in range(self.retries + 1):
            host.check_cancel()
            wait_s = min(60.0, self.backoff * (2 ** attempt)) * (1 + 0.25 * random.random())
            try:
                status, headers, data = self._post(body, key)
            except (socket.timeout, TimeoutError) as e:
                last = f"no answer within {self.timeout:g} s ({e.__class__.__name__})"
            except urllib.error.URLError as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = f"no answer within {self.timeout:g} s"
                else:
                    last = f"cannot connect ({_scrub(str(reason), key)})"
            except (ConnectionError, OSError) as e:
                last = f"cannot connect ({_scrub(str(e), key)})"
            else:
                if status == 200:
                    return self._parse(data, key)
                snippet = _scrub(data[:300].decode("utf-8", "replace"), key).strip()
                if status in RETRY_STATUS:
                    last = f"HTTP {status} {snippet[:120]}"
                    retry_after = headers.get("Retry-After") or headers.get("retry-after")
                    if retry_after:
                        try:
                            wait_s = min(60.0, max(wait_s, float(retry_after)))
                        except ValueError:
                            pass
                else:
                    raise self._http_error(status, snippet, key)
            if attempt < self.retries:
                self._sleep(wait_s)
        hint = ""
        if last.startswith("cannot connect"):
            hint = (" - is the server running and is base_url right? (Ollama: `ollama serve`, base_url "
                    "http://127.0.0.1:11434/v1; LM Studio: start its local server, http://127.0.0.1:1234/v1)")
        elif last.startswith("no answer"):
            hint = " - raise timeout, lower concurrency, or use a smaller model"
        else:
            hint = " - the server is overloaded or failing; try again later, or lower concurrency"
        raise UnconfusedError(f"{self.url} gave up after {self.retries + 1} attempts: {last}{hint}", input="base_url")

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            host.check_cancel()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def _http_error(self, status: int, snippet: str, key: str | None) -> UnconfusedError:
        if status in (401, 403):
            where = (f"the key from the environment variable {self.api_key_env.strip()}" if key else
                     "no key (api_key_env is empty or its variable is not set)")
            return UnconfusedError(f"the server refused the request (HTTP {status}) with {where}: set the right "
                                   f"key in that variable before starting ComfyUI. Server said: {snippet[:200]}", input="api_key_env")
        if status == 404:
            return UnconfusedError(f"HTTP 404 from {self.url}: check base_url (it usually ends in /v1) and that "
                                   f"the model '{self.model}' exists on the server. Server said: {snippet[:200]}", input="model")
        return UnconfusedError(f"HTTP {status} from {self.url}: {snippet[:300]} - check model '{self.model}' "
                               "supports image input and the settings", input="model")

    def _parse(self, data: bytes, key: str | None) -> str:
        def garbage(why: str) -> UnconfusedError:
            shown = _scrub(data[:200].decode("utf-8", "replace"), key)
            return UnconfusedError(f"the server at {self.url} answered something that is not a chat-completions "
                                   f"reply ({why}): {shown!r} - is base_url an OpenAI-compatible endpoint?", input="base_url")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise garbage("not JSON") from None
        if not isinstance(obj, dict):
            raise garbage("not a JSON object")
        if "error" in obj and not obj.get("choices"):
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise UnconfusedError(f"the server reported an error: {_scrub(str(msg), key)[:300]}",
                                  input="model")
        try:
            content = obj["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise garbage("no choices[0].message.content") from None
        if isinstance(content, list):  # content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise garbage("content is not text")
        return content.strip()

    def caption(self, images: list[Image.Image], instructions: list[str],
                on_done: Callable[[int], None] | None = None) -> list[str]:
        """Captions for all images, at most `concurrency` requests at a time, in input order."""
        out: list[str | None] = [None] * len(images)
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(images) or 1)),
                                  thread_name_prefix="unconfused-vlm")
        try:
            futures = {pool.submit(host.in_context(self.caption_one), img, ins): i
                       for i, (img, ins) in enumerate(zip(images, instructions))}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for f in done:
                    out[futures[f]] = f.result()  # the first error stops the whole batch
                    if on_done:
                        on_done(futures[f])
                host.check_cancel()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return [o or "" for o in out]


# ------------------------------------------------------------------------------------------------
# Local transformers model.

def list_local_models() -> list[str]:
    """Folders of the LLM model kind that hold a transformers model (config.json)."""
    return host.list_model_dirs("LLM", "config.json")


@dataclass
class LocalBackend:
    name: str
    device: str = "auto"
    precision: str = "auto"
    max_new_tokens: int = 120

    def _folder(self) -> Path:
        path = host.find_model("LLM", self.name, input="local_model",
                               what="vision-language model folder (config.json, weights, processor files)")
        if not (path / "config.json").is_file():
            raise UnconfusedError(f"'{self.name}' has no config.json: put a whole transformers model folder into "
                                  "models/LLM/<name>", input="local_model")
        return path

    def load(self):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        path = self._folder()
        dev = host.device(self.device)
        dtype = host.default_dtype(dev, self.precision)
        try:
            cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise UnconfusedError(f"'{self.name}' is not a model transformers can read offline without running "
                                  f"code from the folder ({e.__class__.__name__}: {str(e)[:200]}); use a model "
                                  "transformers supports natively (LLaVA, Qwen2-VL, Idefics, SmolVLM, Gemma 3, ...)", input="local_model") from None
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                                dtype=dtype)
        except (ValueError, KeyError, OSError) as e:
            raise UnconfusedError(f"'{self.name}' ({cfg.model_type}) cannot be loaded as an image-text-to-text model "
                                  f"with its processor: {str(e)[:300]}",
                                  input="local_model") from None
        model.to(dev).eval()
        return processor, model, dev, torch

    def _inputs(self, processor, image: Image.Image, instruction: str):
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image", "image": image.convert("RGB")},
                                                     {"type": "text", "text": instruction}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")
        image_token = getattr(processor, "image_token", None)  # no chat template: "<image>\n<instruction>"
        text = f"{image_token}\n{instruction}" if isinstance(image_token, str) and image_token else instruction
        return processor(images=image.convert("RGB"), text=text, return_tensors="pt")

    def caption(self, images: list[Image.Image], instructions: list[str],
                on_done: Callable[[int], None] | None = None) -> list[str]:
        processor, model, dev, torch = self.load()
        out = []
        try:
            with torch.inference_mode():
                for i, (img, ins) in enumerate(zip(images, instructions)):
                    host.check_cancel()
                    inputs = self._inputs(processor, img, ins)
                    inputs = {k: (v.to(dev, dtype=model.dtype) if torch.is_floating_point(v) else v.to(dev))
                              for k, v in inputs.items() if hasattr(v, "to")}
                    ids = model.generate(**inputs, max_new_tokens=int(self.max_new_tokens), do_sample=False)
                    prompt_len = 0 if getattr(model.config, "is_encoder_decoder", False) or "input_ids" not in inputs \
                        else inputs["input_ids"].shape[1]
                    new = ids[:, prompt_len:]
                    out.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
                    if on_done:
                        on_done(i)
        finally:
            del model, processor
            gc.collect()
            host.empty_cache()
        return out
