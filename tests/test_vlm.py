"""VLM backends of the SID captioner: a real chat-completions HTTP server on 127.0.0.1 started by
the test, a tiny random-weight LLaVA built from a config and loaded offline, and the node."""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from unconfused.engine.data import concepts as C
from unconfused.engine import host
from unconfused.engine.captions import vlm
from unconfused.engine.errors import UnconfusedError
from unconfused.nodes.captions import UnconfusedSIDCaptioner

sys.path.insert(0, str(Path(__file__).parent))
from vlm_helpers import GOOD, FakeServer  # noqa: E402

KEY = "sk-test-5f1e9d0c8b7a6f5e4d3c2b1a-never-leak"
ENV = "UNCONFUSED_TEST_VLM_KEY"


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _img(w=300, h=200, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def _backend(server, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return vlm.OpenAIBackend(server.url, "gpt-test", ENV, **kw)


def test_request_shape_and_answer(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    out = _backend(server, max_image_side=128).caption([_img()], ["Describe {x} <sks> dog"])
    assert out == [GOOD]
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["headers"]["Content-Type"] == "application/json"
    body = json.loads(req["body"])
    assert body["model"] == "gpt-test" and body["stream"] is False and body["max_tokens"] > 0
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    parts = {p["type"]: p for p in msg["content"]}
    assert parts["text"]["text"] == "Describe {x} <sks> dog"
    url = parts["image_url"]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert max(img.size) == 128 and img.size == (128, 85)


def test_no_key_when_variable_unset(server, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert _backend(server).caption([_img()], ["x"]) == [GOOD]
    assert "Authorization" not in server.requests[0]["headers"]


def test_local_server_bypasses_a_proxy(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert _backend(server, retries=0).caption([_img()], ["x"]) == [GOOD]


def test_429_then_success(server):
    server.script = [("status", 429, '{"error": "rate limited"}'), ("status", 503, "busy")]
    assert _backend(server, retries=3).caption([_img()], ["x"]) == [GOOD]
    assert len(server.requests) == 3


def test_500_until_give_up(server):
    server.default = ("status", 500, "internal error")
    with pytest.raises(UnconfusedError) as e:
        _backend(server, retries=2).caption([_img()], ["x"])
    assert len(server.requests) == 3
    msg = str(e.value)
    assert "gave up after 3 attempts" in msg and "HTTP 500" in msg and "input 'base_url'" in msg


def test_timeout(server):
    server.default = ("sleep", 1.5, GOOD)
    t = time.monotonic()
    with pytest.raises(UnconfusedError) as e:
        _backend(server, retries=1, timeout=0.3).caption([_img()], ["x"])
    assert "no answer within 0.3 s" in str(e.value) and "raise timeout" in str(e.value)
    assert time.monotonic() - t < 1.5 and len(server.requests) == 2


@pytest.mark.parametrize("step,words", [
    (("raw", b"<html><body>Welcome to nginx</body></html>"), "not JSON"),
    (("json", {"object": "list", "data": []}), "no choices[0].message.content"),
    (("json", [1, 2, 3]), "not a JSON object"),
    (("json", {"error": {"message": "model does not support images"}}), "does not support images"),
])
def test_garbage_answers(server, step, words):
    server.script = [step]
    with pytest.raises(UnconfusedError) as e:
        _backend(server, retries=0).caption([_img()], ["x"])
    assert words in str(e.value)


def test_content_parts_and_errors(server):
    server.script = [("json", {"choices": [{"message": {"content": [{"type": "text", "text": "A <sks> dog"},
                                                                    {"type": "text", "text": "on a rug."}]}}]})]
    assert _backend(server).caption([_img()], ["x"]) == ["A <sks> dog on a rug."]
    server.script = [("status", 404, "no such model")]
    with pytest.raises(UnconfusedError, match="input 'model'.*404"):
        _backend(server).caption([_img()], ["x"])


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = vlm.OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", "", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(UnconfusedError) as e:
        b.caption([_img()], ["x"])
    assert "cannot connect" in str(e.value) and "is the server running" in str(e.value)


def test_bad_settings_are_named():
    with pytest.raises(UnconfusedError, match="input 'base_url'"):
        vlm.OpenAIBackend("localhost:11434", "m")
    with pytest.raises(UnconfusedError, match="input 'base_url'"):
        vlm.OpenAIBackend("http://user:pw@example.com/v1", "m")
    with pytest.raises(UnconfusedError, match="input 'model'"):
        vlm.OpenAIBackend("http://127.0.0.1:1/v1", " ")
    with pytest.raises(UnconfusedError) as e:
        vlm.OpenAIBackend("http://127.0.0.1:1/v1", "m", KEY)  # the key pasted where its NAME belongs
    assert "input 'api_key_env'" in str(e.value) and KEY not in str(e.value)
    assert vlm.chat_url("https://api.openai.com/v1/") == "https://api.openai.com/v1/chat/completions"


def test_key_only_over_https_or_to_this_machine(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    b = vlm.OpenAIBackend("http://192.0.2.1:8080/v1", "m", ENV, retries=0, timeout=1)
    with pytest.raises(UnconfusedError) as e:
        b.caption([_img()], ["x"])
    assert "over plain http" in str(e.value) and "input 'base_url'" in str(e.value) and KEY not in str(e.value)


def test_concurrency_limit(server):
    server.default = ("sleep", 0.15, GOOD)
    out = _backend(server, concurrency=2).caption([_img() for _ in range(6)], [f"x{i}" for i in range(6)])
    assert out == [GOOD] * 6 and len(server.requests) == 6
    assert server.max_inflight == 2


def test_answers_keep_the_image_order(server):
    class Ordered(FakeServer):
        pass
    server.default = ("sleep", 0.0, GOOD)
    seen = []
    b = _backend(server, concurrency=3)
    orig = b.caption_one
    b.caption_one = lambda img, ins: (time.sleep(0.05 * (3 - int(ins))), seen.append(ins), ins)[-1]
    assert b.caption([_img()] * 3, ["0", "1", "2"]) == ["0", "1", "2"]
    assert seen != ["0", "1", "2"]  # finished out of order, returned in order
    del orig


def test_cancel_stops_waiting_requests(server):
    from unconfused.engine.errors import Cancelled
    server.default = ("sleep", 0.6, GOOD)
    timer = threading.Timer(0.2, host.request_cancel)
    timer.start()
    t = time.monotonic()
    with pytest.raises(Cancelled):
        _backend(server, concurrency=1).caption([_img()] * 5, ["x"] * 5)
    assert time.monotonic() - t < 1.0 and len(server.requests) <= 2
    host.clear_cancel()


# ---------------------------------------------------------------------------------------------- node

def _node_inputs(server, **kw):
    inputs = dict(backend="openai-compatible", mode="subject", describe_pose=False,
                  instruction=UnconfusedSIDCaptioner.INPUT_TYPES()["required"]["instruction"][1]["default"],
                  base_url=server.url if server else "http://127.0.0.1:1/v1", model="gpt-test", api_key_env=ENV,
                  local_model="x", device="cpu", precision="auto", manual_captions="",
                  on_flagged="use template caption", template="a photo of {subject}", retries=2, concurrency=2)
    inputs.update(kw)
    return inputs


def _concept(n=3):
    return C.make_concept("<sks>", "dog", torch.rand(n, 48, 64, 3))


def test_node_flags_and_repairs_and_never_leaks_the_key(server, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, KEY)
    server.script = [("status", 429, "slow down"), ("ok", GOOD)]
    answers = {"1": "The brown dog lies on a red plaid blanket.",  # repairable
               "2": "A cozy room with a grey sofa.",  # no subject: flagged
               "3": "A <sks> dog with fluffy golden fur, his ears floppy, has a shiny black nose."}  # describes it
    server.default = ("ok", "unused")
    real_post = vlm.OpenAIBackend._post
    order = iter(["0", "1", "2", "3"])

    def post(self, body, key):
        status, headers, data = real_post(self, body, key)
        return status, headers, data

    monkeypatch.setattr(vlm.OpenAIBackend, "_post", post)
    server.script = [("status", 429, "slow down"), ("ok", GOOD), ("ok", answers["1"]), ("ok", answers["2"]),
                     ("ok", answers["3"])]
    inputs = _node_inputs(server, concurrency=1)
    res = UnconfusedSIDCaptioner().caption(_concept(4), **inputs)
    concept, captions, report, flagged = res["result"]
    caps = captions.splitlines()
    assert caps[0] == GOOD
    assert caps[1] == "The <sks> dog lies on a red plaid blanket."
    assert caps[2] == caps[3] == "a photo of <sks> dog"  # flagged -> template fallback
    assert flagged == 2 and concept.captions == caps
    assert "FLAGGED" in report and "dropped 'brown'" in report and "does not mention the subject" in report
    assert "trained with the template caption" in report
    assert res["ui"]["images"] and res["ui"]["text"] == [report]
    assert len(server.requests) == 5 and all(r["headers"]["Authorization"] == f"Bearer {KEY}"
                                             for r in server.requests)
    # the key is nowhere: outputs, report, saved files, preview PNG, workflow inputs
    C.save_concept_set(C.make_concept_set([concept]), tmp_path / "set")
    blobs = [captions.encode(), report.encode(), json.dumps(inputs).encode()]
    blobs += [p.read_bytes() for p in (tmp_path / "set").rglob("*") if p.is_file()]
    blobs += [p.read_bytes() for p in host.temp_dir().rglob("*") if p.is_file()]
    assert len(blobs) > 8
    for b in blobs:
        assert KEY.encode() not in b and KEY[8:24].encode() not in b
    # the key in a server error body is scrubbed from the message
    server.script = [("status", 401, f"invalid key {KEY}")]
    with pytest.raises(UnconfusedError) as e:
        UnconfusedSIDCaptioner().caption(_concept(1), **inputs)
    assert KEY not in str(e.value) and ENV in str(e.value) and "input 'api_key_env'" in str(e.value)
    del order


def test_node_stop_on_flagged_and_manual_and_template():
    node = UnconfusedSIDCaptioner()
    concept = _concept(2)
    res = node.caption(concept, **_node_inputs(None, backend="manual",
                                               manual_captions="A brown puppy on a rug.\nA <sks> dog on a bed."))
    assert res["result"][1].splitlines() == ["A <sks> dog on a rug.", "A <sks> dog on a bed."]
    with pytest.raises(UnconfusedError, match="input 'manual_captions'"):
        node.caption(concept, **_node_inputs(None, backend="manual", manual_captions="one line only"))
    with pytest.raises(UnconfusedError, match="input 'on_flagged'"):
        node.caption(concept, **_node_inputs(None, backend="manual", on_flagged="stop with an error",
                                             manual_captions="I'm sorry, I cannot.\nA <sks> dog on a bed."))
    res = node.caption(concept, **_node_inputs(None, backend="template (Case 1 baseline)"))
    assert res["result"][1].splitlines() == ["a photo of <sks> dog"] * 2 and res["result"][3] == 0
    res = node.caption(C.make_concept("<vg>", "art", torch.rand(1, 32, 32, 3)),
                       **_node_inputs(None, backend="template (Case 1 baseline)", mode="style"))
    assert res["result"][1] == "a painting in the style of <vg> art"
    with pytest.raises(UnconfusedError, match="input 'local_model'"):
        node.caption(concept, **_node_inputs(None, backend="local transformers", local_model="missing"))
    with pytest.raises(UnconfusedError, match="input 'local_model'.*models/LLM"):
        node.caption(concept, **_node_inputs(None, backend="local transformers", local_model="(none)"))
    assert UnconfusedSIDCaptioner.INPUT_TYPES()["required"]["local_model"][0] == ["(none)"]


def test_set_node_captions_every_concept(server, tmp_path):
    from unconfused.nodes.captions import UnconfusedSIDCaptionSet
    cs = C.make_concept_set([_concept(2), C.make_concept("<alice>", "woman", torch.rand(1, 40, 40, 3))])
    server.script = [("ok", GOOD), ("ok", "A dog on a striped rug by a brass lamp."), ("ok", "A lady in a red coat at a bus stop.")]
    inputs = _node_inputs(server, concurrency=1)
    res = UnconfusedSIDCaptionSet().caption(cs, **inputs)
    out, captions, report, flagged = res["result"]
    assert captions.splitlines() == [GOOD, "A <sks> dog on a striped rug by a brass lamp.",
                                      "A <alice> woman in a red coat at a bus stop."]
    assert out.tokens == ["<sks>", "<alice>"] and out.concepts[1].captions == [captions.splitlines()[2]]
    assert "<sks>: 2 captions" in report and "<alice>: 1 captions" in report and flagged == 0
    with pytest.raises(UnconfusedError, match="input 'manual_captions'"):
        UnconfusedSIDCaptionSet().caption(cs, **_node_inputs(None, backend="manual", manual_captions="a\nb"))
    res = UnconfusedSIDCaptionSet().caption(cs, **_node_inputs(None, backend="manual", manual_captions=(
        "A <sks> dog on a mat.\nA brown dog on a bed.\nA woman on a bench in a park.")))
    assert res["result"][1].splitlines()[2] == "A <alice> woman on a bench in a park."
    assert "concept_set" in UnconfusedSIDCaptionSet.INPUT_TYPES()["required"]


# ---------------------------------------------------------------------------------------------- local

def build_tiny_llava(folder: Path) -> Path:
    """A random-weight LLaVA (CLIP vision tower + Llama) with a word-level tokenizer and a chat
    template, saved as an ordinary transformers folder - what a user puts into models/LLM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:"] + (
        "a the <sks> dog on in with next to red blue green rug sofa grass table sitting lying photo of".split())
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          chat_template=template, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_id=4, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def test_local_backend_offline_and_unloaded(tmp_path, monkeypatch):
    folder = build_tiny_llava(tmp_path / "models" / "LLM" / "tiny-llava")
    assert vlm.list_local_models() == ["tiny-llava"]
    assert UnconfusedSIDCaptioner.INPUT_TYPES()["required"]["local_model"][0] == ["(none)", "tiny-llava"]
    import transformers
    loaded = []
    real = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*a, **kw):
        assert kw["local_files_only"] is True and kw["trust_remote_code"] is False
        loaded.append(kw["dtype"])
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    import gc
    import weakref
    refs = []
    real_load = vlm.LocalBackend.load

    def load(self):
        processor, model, dev, t = real_load(self)
        refs.append(weakref.ref(model))
        return processor, model, dev, t

    monkeypatch.setattr(vlm.LocalBackend, "load", load)
    res = UnconfusedSIDCaptioner().caption(_concept(2), **_node_inputs(None, backend="local transformers",
                                                                        local_model="tiny-llava", max_tokens=8))
    concept, captions, report, flagged = res["result"]
    assert loaded == [torch.float32]
    assert len(captions.splitlines()) == 2 and len(concept.captions) == 2
    assert flagged == 2 and report.count("FLAGGED") == 2  # random weights write garbage; it is flagged
    gc.collect()
    assert refs and refs[0]() is None  # the model was released after use
    # fp16 / explicit dtype choice reaches the loader
    vlm.LocalBackend("tiny-llava", device="cpu", precision="bf16", max_new_tokens=4).caption([_img()], ["a photo"])
    assert loaded[-1] == torch.bfloat16
    # a processor without a chat template: the "<image>\n<instruction>" prompt path
    (folder / "chat_template.jinja").unlink()
    out = vlm.LocalBackend("tiny-llava", device="cpu", max_new_tokens=4).caption([_img(), _img(40, 90)], ["a", "b"])
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
