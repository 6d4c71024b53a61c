"""GPU memory plan of a training run, made without a GPU.

One training step of the real model (full-size architecture, random weights: memory does not
depend on values) runs under torch's `FakeTensorMode`: every tensor has its shape, dtype and
storage size but no data, so a 860M-parameter UNet step costs seconds of CPU and no memory.
A dispatch-mode counter (`MemoryCounter`) adds up the storages alive at each moment - the
weights, the trained tensors and their gradients, the optimizer state, the activations kept
for backward and each op's temporaries - and keeps the peak: what CUDA's caching allocator
would report as `max_memory_allocated` for the same ops. (torch's own
`torch.distributed._tools.mem_tracker.MemTracker` assumes every parameter trains; ours are
mostly frozen, so it refuses them.)

The LoRA and mask-EM plans build the trainers themselves (`LoraTrainer(bundle, data,
settings)` then `.step()`), so they follow the trainers' code. The CLIF plan replicates its
step with the same modules (text encoder, new token rows, peft LoRA or full weights, the
contrastive loss): building `ClifTrainer` needs real image features written to its disk cache
and a held-out evaluation at set-up, neither of which fake tensors can give.

What the counter cannot see is added as a stated allowance (`OVERHEAD_BYTES`, `SLACK`): the CUDA
context and cuBLAS/cuDNN workspaces, and the caching allocator's fragmentation. The CPU runs
SDPA with its flash kernel, which like CUDA's flash/memory-efficient kernels keeps no
attention matrix. fp16 is measured as bf16 (same sizes); 8-bit AdamW, when bitsandbytes is
not installed, as AdamW minus 6 of its 8 state bytes per trained parameter.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..engine import host
from ..engine.errors import UnconfusedError
from ..engine.models.families import FAMILIES

GIB = 1024 ** 3
OVERHEAD_BYTES = int(0.6 * GIB)  # CUDA context (~300-450 MB) + cuBLAS/cuDNN workspaces, outside the allocator
SLACK = 1.10  # the caching allocator's fragmentation and rounding over the live bytes
GPU_SIZES = (6, 8, 12, 16, 24)
TRAINERS = ("lora", "clif", "em")
DEMO_TOWER_EMBED = 32  # the built-in demo model's CLIP (the families declare theirs: Family.clif_tower)


# ------------------------------------------------------------------ the counter
class MemoryCounter(TorchDispatchMode):
    """Bytes of tensor storage alive now and at the peak, counting every tensor an op makes (and
    those `track`ed before) until it is freed. Works on real and on fake tensors alike."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse and other storage-less tensors
            return
        key = id(st)
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def track_alive(self, kind=torch.Tensor) -> int:
        """Count every tensor (of `kind`) alive now; returns the bytes counted."""
        before = self.current
        for obj in gc.get_objects():
            if issubclass(type(obj), kind):  # (not isinstance: some module objects warn on __class__)
                self.track(obj)
        return self.current - before

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class _Scalars(TorchDispatchMode):
    """Under fake tensors, `float(loss)`, `int(index)`, `bool(mask.any())` have no value: answer 1.0 / 0 / True
    (memory does not depend on the answer)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 0)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_session():
    """FakeTensorMode for a training set-up: fake parameters may be moved and cast
    (`Module.to` swaps tensors, which fake mode's own weak references forbid - they are dropped
    first), scalar reads answer 1.0 / 0 / True."""
    import torch.utils
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    real_swap = torch.utils.swap_tensors
    conv = mode.fake_tensor_converter.meta_converter

    def forget(t):
        for r in weakref.getweakrefs(t):
            key = getattr(r, "key", None)
            if key is not None and conv.tensor_memo.get(key) is t:
                del conv.tensor_memo[key]
        with contextlib.suppress(KeyError, TypeError):
            del conv.describer.lookup_tensor[t]

    def swap(a, b):
        forget(a)
        forget(b)
        return real_swap(a, b)

    torch.utils.swap_tensors = swap
    try:
        with mode, _Scalars():
            yield mode
    finally:
        torch.utils.swap_tensors = real_swap


# ------------------------------------------------------------------ models
def fake_bundle(family: str):
    """The family's full-size architecture ('sd1', 'sd2'), or the small demo model ('demo'),
    with fake weights; call inside `fake_session()`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..engine.models import configs as cfg
    from ..engine.models.demo import build_demo_model
    from ..engine.models.loading import build_text_encoder, bundle_from_parts

    if family == "demo":
        bundle = build_demo_model()
    elif family == "sdxl":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        v = cfg.SDXL_VARIANTS[(320, 2048)]  # the full-size SDXL base architecture
        bundle = bundle_from_parts(UNet2DConditionModel(**v["unet"]), AutoencoderKL(**v["vae"]),
                                   CLIPTextModel(CLIPTextConfig(**v["te"])),
                                   text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**v["te2"])),
                                   family="sdxl", name="sdxl (fake weights)")
    elif family not in cfg.UNET:
        raise UnconfusedError(f"unknown model family {family!r}; use sd1, sd2, sdxl or demo", input="family")
    else:
        bundle = bundle_from_parts(UNet2DConditionModel(**cfg.UNET[family]), AutoencoderKL(**cfg.VAE),
                                   build_text_encoder(family), family=family, name=f"{family} (fake weights)")
    bundle._hash = f"plan-{family}"  # fake weights have no bytes to hash, and no run folder resumes on them
    return bundle


def family_of(model_path: str | Path | None) -> str:
    """The family of a checkpoint file or diffusers folder, read from its key names and shapes
    only (the weights are not loaded); no model = the built-in demo model."""
    if not model_path:
        return "demo"
    path = Path(model_path)
    import json

    if path.is_dir():
        if json.loads((path / "model_index.json").read_text()).get("_unconfused_demo"):
            return "demo"
        if (path / "text_encoder_2" / "config.json").is_file():
            return "sdxl"
        te = json.loads((path / "text_encoder" / "config.json").read_text())
        return "sd2" if te.get("hidden_size") == 1024 else "sd1"
    from ..engine.models.loading import detect_family

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    else:
        sd = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
        sd = sd.get("state_dict", sd)
    return detect_family(sd, path.name)


# ------------------------------------------------------------------ plans
@dataclass
class Plan:
    trainer: str
    family: str
    settings: dict  # the settings measured (the memory-relevant ones)
    peak: int  # bytes of tensors alive at the peak of a training step (the allocator's view)
    resident: int  # before the step: weights, trained tensors, cached data
    optimizer_state: int
    trained: int  # bytes of the trained tensors (fp32)
    notes: list[str] = field(default_factory=list)

    @property
    def need(self) -> int:
        """What the GPU must have free: the peak, plus fragmentation and the CUDA context."""
        return int(self.peak * SLACK) + OVERHEAD_BYTES

    def gb(self) -> float:
        return self.need / GIB

    def summary(self) -> str:
        s = self.settings
        keys = ", ".join(f"{k}={v}" for k, v in s.items())
        return (f"{self.trainer} on {self.family}: needs about {self.gb():.1f} GB of GPU memory "
                f"(peak of tensors {self.peak / GIB:.2f} GB: resident {self.resident / GIB:.2f} GB, of which "
                f"trained {self.trained / GIB:.3f} GB; optimizer state {self.optimizer_state / GIB:.3f} GB; "
                f"+{int((SLACK - 1) * 100)}% allocator slack + {OVERHEAD_BYTES / GIB:.1f} GB CUDA context) - {keys}")


MEMORY_KEYS = {
    "lora": ["resolution", "batch_size", "rank", "precision", "gradient_checkpointing", "optimizer", "cache_latents",
             "train_tokens", "text_encoder_lora", "prior_preservation"],
    "em": ["resolution", "batch_size", "rank", "precision", "gradient_checkpointing", "optimizer", "cache_latents"],
    "clif": ["train", "batch_size", "rank", "precision", "optimizer", "cache_features"],
}


def _measure(step, optimizer) -> tuple[int, int, int]:
    """Run one training step `step()` with a counter that first counts everything alive:
    (peak bytes, resident bytes before, optimizer state bytes after). A second step would hold the
    optimizer state all along: its peak is the first's forward/backward peak plus that state, or
    the first's optimizer step (where the state was made), whichever is larger."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    counter = MemoryCounter()
    resident = counter.track_alive(FakeTensor)
    seen = {}

    def before_update(*_):
        seen.setdefault("before_update", counter.peak)

    hook = optimizer.register_step_pre_hook(before_update)
    try:
        with counter:
            step()
    finally:
        hook.remove()
    state = sum(t.untyped_storage().nbytes() for st in optimizer.state.values() for t in st.values()
                if isinstance(t, torch.Tensor) and t.ndim > 0)
    peak = max(seen.get("before_update", counter.peak) + state, counter.peak)
    return peak, resident, state


def _synthetic_concepts(resolution: int):
    from ..engine.data.concepts import Concept, make_concept_set
    from ..engine.data.synthetic import synthetic_concept

    out = []
    for k, (token, word) in enumerate((("<plan-a>", "dog"), ("<plan-b>", "cat"))):
        images, masks = synthetic_concept(k, 2, min(resolution, 128))
        out.append(Concept(token, word, images, masks))
    return make_concept_set(out)


def _lora_like(trainer: str, bundle, settings, run_root: Path):
    from .lora import LoraTrainer

    if trainer == "lora":
        return LoraTrainer(bundle, _synthetic_concepts(settings.resolution), settings, run_root=run_root)
    from .em import EMTrainer, make_scenes
    from ..engine.data.synthetic import synthetic_photos

    a, b = synthetic_photos(0, 1, 128)[0], synthetic_photos(1, 1, 128)[0]
    scene = torch.cat([a, b], dim=1)  # two concepts side by side
    return EMTrainer(bundle, make_scenes([scene], [[("<plan-a>", "dog"), ("<plan-b>", "cat")]]), settings,
                     run_root=run_root)


def _run_lora_like(trainer: str, family: str, settings) -> Plan:
    from ..engine.vision.attention import AttentionCapture

    s0 = settings
    notes: list[str] = []
    # square: the synthetic photos train at resolution x resolution, the largest-area bucket
    s = replace(s0, device="cpu", validation_prompts=[], export=False, aspect="square")
    if s.prior_preservation:  # two batches' graphs alive at once: the same as one batch of twice the size
        s = replace(s, prior_preservation=False, batch_size=2 * s.batch_size)
        notes.append("prior preservation measured as a doubled batch")
    with tempfile.TemporaryDirectory() as tmp, fake_session():
        tr = _lora_like(trainer, fake_bundle(family), s, Path(tmp))
        if trainer == "em":  # the M step with masks and the cross-attention loss (its most expensive phase)
            n, k = len(tr.scenes), len(tr.em_tokens)
            tr.masks = torch.ones(n, k, *tr.latent_sizes[0])
            for p in tr.lora_params:
                p.requires_grad_(True)
            cap = AttentionCapture(tr.bundle.unet, tr.layers, detach=False)
            tr.capture = cap
            base_step = super(type(tr), tr).step
        else:
            cap, base_step = contextlib.nullcontext(), tr.step

        def step():
            with cap:
                base_step(1)

        peak, resident, state = _measure(step, tr.optimizer)
        trained = sum(p.numel() * p.element_size() for p in tr.trainable.values())
    return Plan(trainer, family, {k: getattr(s0, k) for k in MEMORY_KEYS[trainer]}, peak, resident, state, trained,
                notes)


def _run_clif(family: str, settings) -> Plan:
    import torch.nn.functional as F
    from peft import LoraConfig

    from .clif import TEXT_TARGETS, clip_loss
    from ..engine.models.loading import add_text_encoder_lora
    from ..engine.models.concept_tokens import add_concept_tokens, concept_embedding

    s0 = settings
    notes = ["CLIF's step replicated with its modules (its trainer needs real cached image features)"]
    s = s0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[s.precision]
    with fake_session():
        bundle = fake_bundle(family)
        del bundle.unet, bundle.vae  # the CLIF trainer moves only the text encoder to the GPU
        add_concept_tokens(bundle, [("<plan-a>", "dog"), ("<plan-b>", "cat")], s.vectors_per_token)
        te = bundle.text_encoder
        te.to(torch.float32 if s.train == "tokens+full" else dtype)
        te.requires_grad_(False)
        emb = concept_embedding(te)
        groups = [{"params": [emb.new_rows], "lr": s.token_lr}]
        if s.train == "tokens+lora":
            from diffusers.training_utils import cast_training_params

            add_text_encoder_lora(te, LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=TEXT_TARGETS))
            cast_training_params([te], dtype=torch.float32)
            groups.append({"params": [p for n, p in te.named_parameters() if "lora_" in n], "lr": 1e-4})
        elif s.train == "tokens+full":
            full = [p for n, p in te.named_parameters() if "token_embedding" not in n]
            for p in full:
                p.requires_grad_(True)
            groups.append({"params": full, "lr": 1e-4})
        emb.new_rows.requires_grad_(True)
        te.train()
        trainable = [p for p in te.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=s.weight_decay)
        spec = FAMILIES[family].clif_tower if family in FAMILIES else None  # (open_clip model, width, text)
        embed = spec[1] if spec else DEMO_TOWER_EMBED
        proj = torch.zeros(te.config.hidden_size, embed)
        tower = None
        if not s.cache_features and spec:
            import open_clip

            tower = open_clip.create_model(spec[0], pretrained=None).visual.to(dtype).eval()
            notes.append(f"image features computed each step by {spec[0]} (cache_features off)")
        features = torch.zeros(256, embed)  # the cached features of a dataset's pairs
        b = s.batch_size
        autocast = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

        def one():
            ids = torch.randint(0, 49408, (b, 77))
            if tower is not None:
                with torch.no_grad():
                    img = tower(torch.zeros(b, 3, 224, 224, dtype=dtype)).float()
            else:
                img = features[:b]
            with autocast:
                hidden = bundle.spec.contrastive_hidden(bundle, ids)  # as the CLIF trainer reads it
            pooled = hidden[torch.arange(b), torch.full((b,), 76)].float()
            loss = clip_loss(F.normalize(pooled @ proj, dim=-1), F.normalize(img, dim=-1), 100.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        peak, resident, state = _measure(one, opt)
        trained = sum(p.numel() * p.element_size() for p in trainable)
    return Plan("clif", family, {k: getattr(s0, k) for k in MEMORY_KEYS["clif"]}, peak, resident, state, trained,
                notes)


_CACHE: dict[tuple, Plan] = {}


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except ImportError:
        return False


def estimate(trainer: str, family: str, settings) -> Plan:
    """The memory plan of one trainer ('lora', 'clif', 'em') with its settings dataclass, on the
    family's full-size architecture ('sd1', 'sd2') or the demo model ('demo')."""
    if trainer not in TRAINERS:
        raise UnconfusedError(f"unknown trainer {trainer!r}; use one of {TRAINERS}", input="trainer")
    shown = {k: getattr(settings, k) for k in MEMORY_KEYS[trainer]}
    if settings.precision in ("auto", "fp16"):  # the CPU runs bf16: the same sizes
        plan = estimate(trainer, family, replace(settings, precision="bf16"))
        return replace(plan, settings=shown, notes=plan.notes + [
            f"{settings.precision} measured as bf16 (same sizes{'; auto is bf16 or fp16 on a GPU' if settings.precision == 'auto' else ''})"])
    if settings.optimizer == "adamw8bit" and not _has_bitsandbytes():
        plan = estimate(trainer, family, replace(settings, optimizer="adamw"))
        cut = plan.optimizer_state * 6 // 8  # 8-bit moments: 2 bytes per trained parameter instead of 8
        return replace(plan, settings=shown, peak=plan.peak - cut, optimizer_state=plan.optimizer_state - cut,
                       notes=plan.notes + ["adamw8bit estimated as AdamW with 2 state bytes per trained parameter "
                                           "instead of 8 (bitsandbytes is not installed here)"])
    keys = MEMORY_KEYS[trainer] + ["gradient_accumulation", "vectors_per_token", "alpha", "target_modules"]
    key = (trainer, family, tuple(repr(getattr(settings, k, None)) for k in keys))
    if key not in _CACHE:
        with torch.inference_mode(False), torch.enable_grad():
            _CACHE[key] = (_run_clif(family, settings) if trainer == "clif" else
                           _run_lora_like(trainer, family, settings))
    return _CACHE[key]


def measure_cpu(trainer, step: int = 2) -> tuple[int, int]:
    """The real peak of one step of a built LoRA/EM trainer on the CPU, to check `estimate`:
    (bytes alive before the step - its modules, optimizer state, prepared data - plus the CPU
    allocator's peak during it, read from torch.profiler's memory timeline; the step's own peak
    alone). Run a step before, so the optimizer state exists as in every later step."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    counter = MemoryCounter()
    for m in (trainer.bundle.unet, trainer.bundle.vae, trainer.bundle.text_encoder):
        for t in list(m.parameters()) + list(m.buffers()):
            counter.track(t)
    for st in trainer.optimizer.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                counter.track(t)
    for t in trainer.data.tensors():
        counter.track(t)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        trainer.step(step)
    cur = peak = 0
    for _t, action, _key, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return counter.current + peak, peak


# ------------------------------------------------------------------ what fits
def _knobs(trainer: str, settings) -> list[tuple[str, dict]]:
    """Changes that lower memory, cheapest for the result first (applied cumulatively)."""
    s = settings
    out = []
    if s.precision == "fp32":
        out.append(("precision=bf16", {"precision": "bf16"}))
    if trainer == "clif":
        if not s.cache_features:
            out.append(("cache_features=true", {"cache_features": True}))
        if s.optimizer == "adamw" and s.train == "tokens+full":
            out.append(("optimizer=adamw8bit", {"optimizer": "adamw8bit"}))
        b = s.batch_size
        while b > 8:
            b //= 2
            out.append((f"batch_size={b} (contrastive batch: fewer negatives)", {"batch_size": b}))
        if s.train == "tokens+full":
            out.append(("train=tokens+lora", {"train": "tokens+lora"}))
        return out
    if not s.gradient_checkpointing:
        out.append(("gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if not s.cache_latents:
        out.append(("cache_latents=true", {"cache_latents": True}))
    if s.optimizer == "adamw":
        out.append(("optimizer=adamw8bit", {"optimizer": "adamw8bit"}))
    b, acc = s.batch_size, s.gradient_accumulation
    while b > 1:
        b, acc = b // 2, acc * 2
        out.append((f"batch_size={b}, gradient_accumulation={acc} (same effective batch)",
                    {"batch_size": b, "gradient_accumulation": acc}))
    if getattr(s, "text_encoder_lora", False):
        out.append(("text_encoder_lora=false", {"text_encoder_lora": False}))
    r = s.resolution
    while r > 512:
        r -= 128
        out.append((f"resolution={r}", {"resolution": r}))
    return out


@dataclass
class Advice:
    plan: Plan  # of the settings as given
    fits: dict[int, tuple[list[str], Plan] | None]  # GPU GB -> (changes, their plan), None: nothing fits

    def text(self) -> str:
        lines = [self.plan.summary()] + [f"note: {n}" for n in self.plan.notes]
        for gb, got in self.fits.items():
            if got is None:
                lines.append(f"{gb:>2} GB: does not fit even with every change tried")
            elif not got[0]:
                lines.append(f"{gb:>2} GB: fits as it is ({got[1].gb():.1f} GB)")
            else:
                lines.append(f"{gb:>2} GB: set {'; '.join(got[0])} -> {got[1].gb():.1f} GB")
        return "\n".join(lines)


def _merged(names: list[str]) -> list[str]:
    """Cumulative changes as one list: a setting changed twice is named once, at its last value."""
    last = {}
    for n in names:
        last[n.split("=")[0]] = n
    return list(last.values())


def advise(trainer: str, family: str, settings, sizes=GPU_SIZES) -> Advice:
    """The plan, and for each GPU size the first cumulative list of changes that fits."""
    base = estimate(trainer, family, settings)
    steps = [([], settings, base)]
    fits: dict[int, tuple[list[str], Plan] | None] = {}
    knobs = _knobs(trainer, settings)
    for gb in sorted(sizes):
        fits[gb] = None
        for i in range(len(knobs) + 1):
            while len(steps) <= i:  # measured lazily: only as far as a size needs
                names, s, _ = steps[-1]
                label, change = knobs[len(steps) - 1]
                s2 = replace(s, **change)
                steps.append((_merged(names + [label]), s2, estimate(trainer, family, s2)))
            names, _, plan = steps[i]
            if plan.need <= gb * GIB:
                fits[gb] = (names, plan)
                break
    return Advice(base, fits)


# ------------------------------------------------------------------ before a run
def check_fits(trainer: str, bundle, settings, device=None, *, family: str | None = None) -> Plan | None:
    """On a CUDA device, refuse a run whose plan needs more than the free GPU memory, with a
    sentence naming the settings to change. Elsewhere (CPU, MPS) nothing is checked; None.
    The plan is of the bundle's family at full size (the built-in demo model: its own size)."""
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = host.device(getattr(settings, "device", "auto"))
    if dev.type != "cuda":
        return None

    host.free_memory_for_training()  # what the trainer does first: ComfyUI's models leave the GPU
    free, _total = torch.cuda.mem_get_info(dev)
    if family is None:
        family = "demo" if str(getattr(bundle, "name", "")).startswith("unconfused-demo") else \
            getattr(bundle, "family", "sd1") if getattr(bundle, "family", None) in FAMILIES else "sd1"
    plan = estimate(trainer, family, settings)
    if plan.need <= free:
        return plan
    advice = [names for names, p in _fitting(trainer, family, settings, free)]
    fix = (f"set {'; '.join(advice[0])}" if advice and advice[0] else
           "free GPU memory (close other programs) or use a larger GPU")
    raise UnconfusedError(f"this run needs about {plan.gb():.1f} GB of GPU memory but {free / GIB:.1f} GB is free "
                          f"({plan.summary()}); {fix}", input="settings")


def _fitting(trainer, family, settings, free: int):
    s, names = settings, []
    for label, change in _knobs(trainer, settings):
        s, names = replace(s, **change), _merged(names + [label])
        plan = estimate(trainer, family, s)
        if plan.need <= free:
            yield names, plan
            return
