"""The host adapter: the only module through which the engine reaches ComfyUI.

Inside ComfyUI it uses `comfy.utils.ProgressBar`, ComfyUI's interrupt flag and device
choice, `folder_paths` and `server.PromptServer`. Outside ComfyUI (CLI, tests, notebooks)
it falls back to tqdm, a process-wide cancel flag, CPU/CUDA choice and folders given by
the caller (`configure(...)` or the UNCONFUSED_MODELS_DIR / UNCONFUSED_OUTPUT_DIR
environment variables).

ComfyUI modules are looked up in `sys.modules` at call time, never imported here: when the
pack runs inside ComfyUI they are already loaded, and outside it a stray `comfy` package on
the path is never picked up by accident.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import Cancelled, UnconfusedError

log = logging.getLogger("unconfused")

EVENT_PREFIX = "unconfused."

# Model folder kinds we use. Kinds ComfyUI does not know (sams, LLM) are registered on demand.
EXTRA_MODEL_KINDS = {"sams": "sams", "LLM": "LLM"}
MODEL_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"}


def _comfy(name: str):
    """A ComfyUI module if ComfyUI is the running host, else None."""
    return sys.modules.get(name)


def in_comfyui() -> bool:
    return _comfy("folder_paths") is not None and _comfy("comfy.model_management") is not None


# ---------------------------------------------------------------- standalone settings
@dataclass
class _Standalone:
    models_dir: Path | None = None
    output_dir: Path | None = None
    temp_dir: Path | None = None
    extra_folders: dict[str, list[Path]] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    listeners: list[Callable[[str, dict], None]] = field(default_factory=list)


_standalone = _Standalone()


def configure(models_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
              temp_dir: str | os.PathLike | None = None,
              folders: dict[str, list[str | os.PathLike]] | None = None) -> None:
    """Set the folders used outside ComfyUI. `folders` maps a model kind to extra folders."""
    if models_dir is not None:
        _standalone.models_dir = Path(models_dir)
    if output_dir is not None:
        _standalone.output_dir = Path(output_dir)
    if temp_dir is not None:
        _standalone.temp_dir = Path(temp_dir)
    for kind, dirs in (folders or {}).items():
        _standalone.extra_folders[kind] = [Path(d) for d in dirs]


def reset_standalone() -> None:
    """Forget folders, listeners and a pending cancel (tests use this between cases)."""
    global _standalone
    _standalone = _Standalone()


# ---------------------------------------------------------------- cancel
def request_cancel() -> None:
    """Ask the running job to stop at its next check (CLI Ctrl-C, tests)."""
    _standalone.cancel.set()


def clear_cancel() -> None:
    _standalone.cancel.clear()


def check_cancel() -> None:
    """Raise if the user asked to stop. Inside ComfyUI this raises ComfyUI's own
    InterruptProcessingException so the run is reported as interrupted, not failed."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    if _standalone.cancel.is_set():
        _standalone.cancel.clear()
        raise Cancelled()


# ---------------------------------------------------------------- progress
class Progress:
    """A progress bar that also checks for Cancel at every update.

    Inside ComfyUI: the node's progress bar (and optional preview image). Outside: tqdm.
    """

    def __init__(self, total: int, desc: str = ""):
        self.total = max(int(total), 1)
        self.value = 0
        self.desc = desc
        self._bar = None
        self._tqdm = None
        utils = _comfy("comfy.utils")
        if utils is not None and in_comfyui():
            self._bar = utils.ProgressBar(self.total)
        else:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, leave=False,
                              disable=os.environ.get("UNCONFUSED_QUIET") == "1")

    def update(self, n: int = 1, preview: Any = None) -> None:
        self.set(self.value + n, preview)

    def set(self, value: int, preview: Any = None) -> None:
        check_cancel()
        value = min(int(value), self.total)
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, preview)
        elif self._tqdm is not None:
            self._tqdm.update(value - self.value)
        self.value = value

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str = "") -> Progress:
    return Progress(total, desc)


# ---------------------------------------------------------------- device and memory
DEVICE_CHOICES = ["auto", "cuda", "cpu", "mps"]


def device(choice: str = "auto") -> torch.device:
    """The torch device to run on. 'auto' is ComfyUI's device inside ComfyUI, else CUDA if present."""
    if choice not in DEVICE_CHOICES and not choice.startswith("cuda:"):
        raise UnconfusedError(f"unknown device '{choice}'; use one of {DEVICE_CHOICES}", input="device")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":  # Apple GPUs (torch's Metal backend)
        if not torch.backends.mps.is_available():
            raise UnconfusedError("the Apple GPU (mps) was asked for but torch sees none (it needs macOS 12.3+ on "
                                  "Apple silicon and a torch built with MPS); choose 'cpu' or 'auto'",
                                  input="device")
        return torch.device("mps")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnconfusedError("a CUDA GPU was asked for but torch sees none; choose 'cpu' or 'auto'",
                                  input="device")
        return torch.device(choice)
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dev: torch.device, precision: str = "auto") -> torch.dtype:
    """Weights dtype for inference: fp16/bf16 on GPUs, fp32 on the CPU."""
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision in table:
        return table[precision]
    if precision != "auto":
        raise UnconfusedError(f"unknown precision '{precision}'; use auto, fp32, fp16 or bf16",
                              input="precision")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextlib.contextmanager
def running_on(module: torch.nn.Module, choice: str = "auto", precision: str = "auto",
               half: bool = True) -> Iterator[torch.device]:
    """A frozen helper model (SAM, CLIP, DINO) on its compute device for one call, in inference
    mode - with fp16/bf16 autocast on a GPU when `half` (autocast, not .half(): pre- and
    post-processing stay fp32) - then back on the CPU with the cache emptied, so ComfyUI gets the
    memory back between nodes."""
    dev = device(choice)
    dtype = default_dtype(dev, precision)
    module.to(dev)
    try:
        ctx = torch.autocast(dev.type, dtype=dtype) if half and dev.type == "cuda" and dtype != torch.float32 \
            else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            yield dev
    finally:
        module.to("cpu")
        if dev.type != "cpu":
            empty_cache()


def free_memory_for_training() -> None:
    """Ask ComfyUI to unload its models and empty caches before a training run."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def empty_cache() -> None:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """ComfyUI runs every prompt under torch.inference_mode(); training must leave it.

    Tensors created under inference mode cannot be saved for backward: clone incoming
    tensors inside this block (`detach_clone`).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def detach_clone(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor from a possibly-inference tensor, usable in autograd."""
    with torch.inference_mode(False):
        return t.detach().clone()


# ---------------------------------------------------------------- folders
def _register_comfy_kind(fp, kind: str) -> None:
    if kind in fp.folder_names_and_paths:
        return
    folder = os.path.join(fp.models_dir, EXTRA_MODEL_KINDS.get(kind, kind))
    fp.folder_names_and_paths[kind] = ([folder], MODEL_EXTENSIONS | {""} if kind == "LLM" else MODEL_EXTENSIONS)


def model_folders(kind: str) -> list[Path]:
    """Folders searched for models of a kind ('checkpoints', 'sams', 'clip_vision', ...)."""
    fp = _comfy("folder_paths")
    if fp is not None:
        _register_comfy_kind(fp, kind)
        return [Path(p) for p in fp.get_folder_paths(kind)]
    folders = list(_standalone.extra_folders.get(kind, []))
    base = _standalone.models_dir or (Path(os.environ["UNCONFUSED_MODELS_DIR"])
                                      if os.environ.get("UNCONFUSED_MODELS_DIR") else None)
    if base is not None:
        folders.append(base / EXTRA_MODEL_KINDS.get(kind, kind))
    return folders


def list_models(kind: str, extensions: set[str] | None = None) -> list[str]:
    """File names (relative to their folder, '/'-separated) of a model kind, sorted."""
    fp = _comfy("folder_paths")
    if fp is not None and extensions is None:
        _register_comfy_kind(fp, kind)
        return sorted(fp.get_filename_list(kind))
    exts = extensions or MODEL_EXTENSIONS
    names: set[str] = set()
    for folder in model_folders(kind):
        if not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix.lower() in exts:
                names.add(path.relative_to(folder).as_posix())
    return sorted(names)


def list_model_dirs(kind: str, marker: str) -> list[str]:
    """Sub-folders of a model kind that contain `marker` (e.g. diffusers' model_index.json)."""
    names: set[str] = set()
    for folder in model_folders(kind):
        if folder.is_dir():
            for path in folder.rglob(marker):
                names.add(path.parent.relative_to(folder).as_posix())
    return sorted(names)


def find_model(kind: str, name: str, *, input: str | None = None,
               what: str = "model file") -> Path:
    """Full path of a model, or an error that says which file to put where."""
    folders = model_folders(kind)
    if name:
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise UnconfusedError(f"'{name}' is not a file name inside the {kind} folder",
                                  input=input)
        for folder in folders:
            path = folder / name
            if path.exists():
                return path
    where = ", ".join(str(f) for f in folders) or f"models/{kind} (no models folder is configured)"
    if not name:
        raise UnconfusedError(f"no {what} was chosen and none was found: put one into {where}, "
                              "then refresh the page (R) and pick it", input=input)
    raise UnconfusedError(f"'{name}' was not found: put the {what} into {where}", input=input)


def output_dir() -> Path:
    fp = _comfy("folder_paths")
    if fp is not None:
        return Path(fp.get_output_directory())
    if _standalone.output_dir is not None:
        return _standalone.output_dir
    if os.environ.get("UNCONFUSED_OUTPUT_DIR"):
        return Path(os.environ["UNCONFUSED_OUTPUT_DIR"])
    return Path.cwd() / "outputs"


def text_encoder_folder_kind() -> str:
    """ComfyUI's model folder kind for text encoders: `text_encoders` (2024-10+), `clip` before."""
    fp = _comfy("folder_paths")
    if fp is not None and "text_encoders" not in fp.folder_names_and_paths:
        return "clip"
    return "text_encoders"


def input_dir() -> Path:
    """ComfyUI's input folder (where uploaded images go); the working directory outside it."""
    fp = _comfy("folder_paths")
    if fp is not None:
        return Path(fp.get_input_directory())
    return Path(os.environ.get("UNCONFUSED_INPUT_DIR", Path.cwd()))


def temp_dir() -> Path:
    fp = _comfy("folder_paths")
    if fp is not None:
        return Path(fp.get_temp_directory())
    if _standalone.temp_dir is not None:
        return _standalone.temp_dir
    path = Path(tempfile.gettempdir()) / "unconfused"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- messages to the browser
def add_listener(fn: Callable[[str, dict], None]) -> None:
    """Receive every message (outside ComfyUI; tests and the CLI log)."""
    _standalone.listeners.append(fn)


_running_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("unconfused_running_node",
                                                                         default=None)
_running_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("unconfused_running_name",
                                                                         default=None)


@contextlib.contextmanager
def running_node(unique_id: Any = None, name: str | None = None) -> Iterator[None]:
    """Tell the engine which node is running: `unique_id` (ComfyUI's hidden input UNIQUE_ID) makes
    every message sent inside the block carry `node_id` so the browser can find the node; `name`
    (the node's id such as UnconfusedTrainLoRA, or a job section in the CLI) names the node in every
    UnconfusedError raised inside the block that names none itself. A name of None keeps the
    enclosing block's. The pack's registration (nodes/common.py) runs every node in one."""
    token = _running_node.set(None if unique_id is None else str(unique_id))
    name_token = _running_name.set(_running_name.get() if name is None else str(name))
    try:
        yield
    finally:
        _running_name.reset(name_token)
        _running_node.reset(token)


def current_node() -> str | None:
    """The graph node id set by `running_node`, or None (CLI, tests, a node that set none)."""
    return _running_node.get()


def current_node_name() -> str | None:
    """The node name set by `running_node` (the running node, a CLI job's section), or None."""
    return _running_name.get()


def named(name: str) -> Callable[[Callable], Callable]:
    """Decorator for a headless entry point (a CLI command, a benchmark): `fn` runs as `name` (keeping
    the graph node id, if any), so every error raised below it names the command, as a node's do."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with running_node(current_node(), name=name):
                return fn(*args, **kwargs)
        return run
    return wrap


def in_context(fn: Callable) -> Callable:
    """`fn` bound to the caller's running node, for work handed to a thread pool (a thread does not
    inherit it), so errors raised there still name the node."""
    ctx = contextvars.copy_context()
    return lambda *args, **kwargs: ctx.copy().run(fn, *args, **kwargs)  # a copy per call: runs may overlap


def _prompt_server():
    server = _comfy("server")
    if server is not None and getattr(server, "PromptServer", None) is not None:
        return getattr(server.PromptServer, "instance", None)
    return None


def has_receivers() -> bool:
    """Whether a message would reach anyone (a browser through ComfyUI, or a local listener);
    senders skip costly work (pictures) when not."""
    return _prompt_server() is not None or bool(_standalone.listeners)


def send(event: str, data: dict) -> None:
    """Send `unconfused.<event>` to the browser (inside ComfyUI) and to local listeners.

    Inside a `running_node` block a message without `node_id` gets the running graph node's id
    (the helpers of engine/messages.py always set it, None outside a node)."""
    name = EVENT_PREFIX + event
    node_id = current_node()
    if node_id is not None and "node_id" not in data:
        data = {"node_id": node_id, **data}
    instance = _prompt_server()
    if instance is not None:
        instance.send_sync(name, data, getattr(instance, "client_id", None))
    for fn in list(_standalone.listeners):
        fn(name, data)


class RateLimiter:
    """Lets a message through at most every `interval` seconds (the last one is always sent
    by calling `force=True`)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self._last = 0.0

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False


# ---------------------------------------------------------------- ComfyUI's own models (native hand-off)
# Used by nodes/handoff.py; the pure logic is in engine/models/handoff.py. Only calls that exist in both
# the 2024 ComfyUI and today's are used (or both spellings are tried, as marked).
def comfy_model_info(model) -> dict:
    """A MODEL's config class name (`SD15`, `SDXL`, `Flux`...), the class names of its model
    sampling (a ModelSamplingDiscrete patch included) and its UNet's first conv weight."""
    base = model.model
    sampling = getattr(model, "object_patches", {}).get("model_sampling") or base.model_sampling
    conv = getattr(getattr(base, "diffusion_model", None), "input_blocks", None)
    try:
        conv_in = conv[0][0].weight if conv is not None else None
    except (IndexError, TypeError, AttributeError):
        conv_in = None
    return {"family": type(base.model_config).__name__,
            "sampling": [c.__name__ for c in type(sampling).__mro__], "conv_in": conv_in}


def comfy_checkpoint_state_dict(model, clip, vae) -> dict:
    """MODEL + CLIP + VAE as one checkpoint state dict in LDM keys, built as ComfyUI's checkpoint
    saver builds it, without writing a file. Unpatched weights are ComfyUI's own tensors (nothing
    copied); weights with patches (a LoRA, a merge) are computed the saver's way, on ComfyUI's
    load device."""
    mm = _comfy("comfy.model_management")
    if model.patches or clip.patcher.patches:
        mm.load_models_gpu([model, clip.load_model()])
    else:
        mm.unload_all_models()  # every weight back on its offload device (the CPU), unpatched
    clip_sd = clip.state_dict_for_saving() if hasattr(clip, "state_dict_for_saving") else clip.get_sd()
    vae_sd = vae.get_sd()
    if hasattr(model, "state_dict_for_saving"):  # ComfyUI 2025+
        return model.state_dict_for_saving(clip_sd, vae_sd, None)
    return model.model.state_dict_for_saving(clip_sd, vae_sd, None)


class _ConceptTokenizer:
    """ComfyUI's tokenizer with concept tokens: the prompt is rewritten (`<alice>` ->
    `embedding:<name>`) before ComfyUI's own parsing; everything else is the wrapped tokenizer's."""

    def __init__(self, inner, rewrite: Callable[[str], str]):
        self._inner = inner
        self._rewrite = rewrite

    def tokenize_with_weights(self, text: str, *args, **kwargs):
        return self._inner.tokenize_with_weights(self._rewrite(text), *args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("_inner", "_rewrite"):  # (not set yet: a copy being made)
            raise AttributeError(name)
        return getattr(self._inner, name)


def comfy_apply_concepts(model, clip, lora: dict, text_deltas: dict, embeddings: dict,
                         rewrite: Callable[[str], str], strength_model: float, strength_clip: float):
    """New MODEL and CLIP (clones; the inputs stay as they were) with a kohya-named LoRA added as
    patches the way LoraLoader adds them, text-encoder weight differences as patches, and a
    tokenizer that knows the concept tokens as in-memory embeddings. Returns (model, clip, the
    kohya module names ComfyUI's key map does not know)."""
    import copy

    lora_mod = _comfy("comfy.lora")
    key_map = lora_mod.model_lora_keys_unet(model.model, {})
    key_map = lora_mod.model_lora_keys_clip(clip.cond_stage_model, key_map)
    unknown = sorted({k.split(".", 1)[0] for k in lora} - set(key_map))
    patches = lora_mod.load_lora(lora, key_map) if lora else {}
    new_model = model.clone()
    new_model.add_patches(patches, strength_model)
    new_clip = clip.clone()
    if text_deltas:
        new_clip.add_patches({k: (v,) for k, v in text_deltas.items()}, strength_clip)
    new_clip.add_patches(patches, strength_clip)
    if embeddings:
        outer = new_clip.tokenizer
        if isinstance(outer, _ConceptTokenizer):  # concepts applied before: keep them, add these
            first, then = outer._rewrite, rewrite
            outer, rewrite = outer._inner, (lambda text: then(first(text)))
        outer = copy.copy(outer)  # (shared by every clone: never changed in place)
        # each text encoder's tokenizer (SD1: `outer.clip`; SDXL: clip_l and clip_g) gets the rows of
        # its embedding-file key, as it would read them from a file
        for attr in [n for n, v in vars(outer).items() if hasattr(v, "_try_get_embedding")]:
            setattr(outer, attr, _concept_lookup(copy.copy(getattr(outer, attr)), embeddings))
        new_clip.tokenizer = _ConceptTokenizer(outer, rewrite)
    return new_model, new_clip, unknown


def _concept_lookup(inner, embeddings: dict):
    """ComfyUI's tokenizer `inner` (a copy) that finds the in-memory embeddings first. `embeddings`:
    name -> rows, or name -> {embedding-file key: rows} (the key this tokenizer reads, or the only one)."""
    if inner.embedding_directory is None:
        inner.embedding_directory = []  # ComfyUI reads `embedding:` words only with a directory list
    lookup = inner._try_get_embedding
    own = getattr(inner, "embedding_key", None)

    def rows(value):
        if not isinstance(value, dict):
            return value
        return value[own] if own in value else next(iter(value.values()))

    def try_get_embedding(name: str):
        found = lookup(name)  # (embed, leftover) in 2024; (embed, name, leftover) since 2025
        key = found[1] if len(found) == 3 else name
        return (rows(embeddings[key]),) + tuple(found[1:]) if key in embeddings else found

    inner._try_get_embedding = try_get_embedding
    return inner


def comfy_clip_state_dict(clip) -> dict:
    """The CLIP's weights under the keys its patches use, as this CLIP's patches make them (the
    model is shared by every clone, and may hold another clone's patches right now: those are
    undone from ComfyUI's backup). Unpatched weights are ComfyUI's tensors, not copies."""
    sd = clip.cond_stage_model.state_dict()
    patcher = clip.patcher
    for k, b in getattr(patcher, "backup", {}).items():
        if k in sd:
            sd[k] = getattr(b, "weight", b)  # (a tensor in 2024; a (weight, inplace_update) tuple since)
    for k, patches in patcher.patches.items():
        if k in sd:
            sd[k] = patcher.calculate_weight(patches, sd[k].float().clone(), k).to(sd[k].dtype)
    return sd


def apply_thread_defaults() -> int:
    """Thread defaults for a headless run (the CLI calls this; inside ComfyUI the host decides):
    torch's intra-op threads = the CPUs this process may use (torch counts every core of the
    machine, so in a container limited to 2 CPUs of 64 it ran 32 spinning threads) less those
    other processes keep busy (`threads.idle_cpus`), one inter-op thread, no tokenizers thread
    pool. A user's OMP_NUM_THREADS / MKL_NUM_THREADS wins. Returns the intra-op thread count.
    (The CLI also sets the variables before torch loads: `threads.set_thread_environment`.)"""
    from .threads import idle_cpus, user_chose_threads

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if user_chose_threads():
        return torch.get_num_threads()
    n = idle_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only possible before the first inter-op work
        torch.set_num_interop_threads(1)
    return n


@contextlib.contextmanager
def cancel_checks(*modules: torch.nn.Module) -> Iterator[None]:
    """Check for Cancel before every block of these models runs (their direct children and the
    children of their block lists), not only between steps: a 512px UNet step or a VAE decode
    takes seconds on a CPU, and ComfyUI's Cancel should not wait for it."""
    handles = []

    def hook(_module, _args):
        check_cancel()

    for m in modules:
        for child in m.children():
            targets = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
            handles += [t.register_forward_pre_hook(hook) for t in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
