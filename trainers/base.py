"""The trainer core: what the LoRA, CLIF and mask-EM trainers share, once.

Device and precision, the run folder, optimizer and LR schedule, the trained tensors and their
checkpointing, the step skeleton (gradient accumulation, several processes, clipping, the
gradient scaler), the run skeleton (resume, loop, final checkpoint) and the embedding export.
A trainer fills in named hooks (as kohya's NetworkTrainer does):

    micro_batch_loss(step, micro)   the loss of one micro-batch (required)
    train_mode(on)                  which modules train while the loop runs
    after_training()                validation images, final metrics
    finish(start)                   the trainer's result object (exports, pictures)

The diffusion trainers (trainers/lora.py, and trainers/em.py through it) add their own hooks:
`draw_batch`, `get_noise_pred_and_target`, `call_unet`, `loss_scope`, `extra_loss`.

Mixed precision (docs/trainer-core.md): frozen weights run in the chosen half precision; every
trained tensor - token rows, LoRA, full text-encoder weights - and hence its optimizer state is
fp32 (`configure_optimizer` upcasts exactly the tensors it is given, whatever was cast before);
compute runs under autocast; fp16 adds a `torch.amp.GradScaler`, whose state is checkpointed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..engine import host, presets
from ..engine.errors import UnconfusedError
from ..engine.models.exports import save_embedding
from ..engine.files import safe_name
from ..engine.version import __version__
from .distributed import device_for, world
from .loop import Loop, LoopState, seed_everything

OPTIMIZERS = ["adamw", "adamw8bit"]
LR_SCHEDULERS = ["constant", "constant_with_warmup", "cosine", "linear"]
PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
RESUME = ["auto", "restart"]


def check_common(settings, learning_rates: tuple[str, ...]):
    """The checks every trainer's settings share beyond their declared bounds and choices
    (engine/settings.py: `check_declared` runs after these)."""
    def bad(input: str, msg: str):
        raise UnconfusedError(msg, input=input)

    if settings.steps < 1:
        bad("steps", "must be at least 1")
    if settings.rank < 1:
        bad("rank", "must be at least 1 (8 is the usual)")
    for name in learning_rates:
        if not 0 <= getattr(settings, name) < 1:
            bad(name, "must be between 0 and 1 (e.g. 1e-4)")
    safe_name(settings.name, input="name")


def make_optimizer(groups: list[dict], name: str, weight_decay: float = 1e-2):
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional: only on CUDA machines that have it
        except ImportError as e:
            raise UnconfusedError("adamw8bit needs the bitsandbytes package (pip install bitsandbytes) on a CUDA "
                                  "GPU; choose adamw", input="optimizer") from e
        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def run_trainer(trainer_cls, settings_cls, settings, *args, **kwargs):
    """Build a trainer from settings (a dataclass, a dict from a config file, or None for the
    defaults), seeded as the settings say, and run it."""
    if settings is None:
        settings = settings_cls()
    elif isinstance(settings, dict):
        settings = settings_cls.from_dict(settings)
    seed_everything(settings.seed)
    return trainer_cls(*args, settings, **kwargs).run()


class Precision:
    """Mixed precision for one run: `dtype` for the frozen weights and autocast, fp32 for what trains,
    a gradient scaler for fp16 (small gradients would underflow to zero in fp16 without it)."""

    def __init__(self, device: torch.device, precision: str = "auto"):
        self.device = device
        self.dtype = host.default_dtype(device, precision)  # auto: bf16 where supported, else fp16; fp32 on CPU
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @staticmethod
    def upcast(params) -> None:
        """Trained tensors in fp32 (in place: the Parameter objects stay the same)."""
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer, params: list[torch.Tensor], max_grad_norm: float) -> bool:
        """Unscale (fp16), clip, step. False when the scaler skipped the step (its gradients
        overflowed; the scale is lowered) - then the LR schedule waits too, as accelerate does."""
        if not self.scaler.is_enabled():
            if max_grad_norm and params:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            return True
        self.scaler.unscale_(optimizer)
        if max_grad_norm and params:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale


def first_folder(kind: str) -> Path:
    folders = host.model_folders(kind)
    if not folders:
        raise UnconfusedError(f"no models/{kind} folder is configured; set UNCONFUSED_MODELS_DIR",
                              input="export")
    folders[0].mkdir(parents=True, exist_ok=True)
    return folders[0]


class TrainerCore:
    """The shared part of every trainer. A subclass sets `self.bundle`, `self.tokens`,
    `self.class_words`, calls `configure_optimizer` and `make_loop`, and fills in the hooks."""

    kind = ""  # "lora" | "clif" | "em": metadata `unconfused_trainer`
    node = ""  # the trainer's node id: its progress messages, charts and stage names

    def __init__(self, settings, *, run_root: Path | None = None):
        self.settings = settings.validated()
        s = self.settings
        self.world = world()
        self.device = device_for(self.world, host.device(s.device))
        self.precision = Precision(self.device, s.precision)
        self.weight_dtype = self.precision.dtype
        self.run_dir = Path(run_root or host.output_dir() / "unconfused" / "runs") / safe_name(s.name, input="name")

    # ------------------------------------------------------------ what trains
    def configure_optimizer(self, trainable: dict[str, torch.nn.Parameter], groups: list[dict], *,
                            weight_decay: float, warmup_steps: int) -> None:
        """Register the trained tensors (name -> parameter), upcast them to fp32 (and with them the
        optimizer state), and build the optimizer and LR schedule."""
        from diffusers.optimization import get_scheduler

        s = self.settings
        self.trainable = trainable
        Precision.upcast(trainable.values())
        self.optimizer = make_optimizer([g for g in groups if g["params"]], s.optimizer, weight_decay)
        self.lr_scheduler = get_scheduler(s.lr_scheduler, self.optimizer, num_warmup_steps=warmup_steps,
                                          num_training_steps=s.steps)

    def make_loop(self, config: dict, generator: torch.Generator | None = None) -> None:
        s = self.settings
        self.loop = Loop(self.node, s.steps, self.run_dir, config,
                         LoopState(self.get_trainables, self.set_trainables, self.optimizer, self.lr_scheduler,
                                   generator, scaler=self.precision.scaler),
                         checkpoint_every=s.checkpoint_every, keep_checkpoints=s.keep_checkpoints,
                         on_step=self._on_step, is_main=self.world.is_main)
        if self.world.is_main:  # the preset and every effective setting, with where each came from
            presets.write_record(self.run_dir, s)

    def get_trainables(self) -> dict[str, torch.Tensor]:
        return self.trainable

    def set_trainables(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable) - set(state)
        if missing:
            raise UnconfusedError(f"the checkpoint lacks {len(missing)} trained tensors; set resume to 'restart'", input="resume")
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(state[k].to(p.device, p.dtype))

    # ------------------------------------------------------------ hooks
    def micro_batch_loss(self, step: int, micro: int) -> torch.Tensor:
        raise NotImplementedError

    def train_mode(self, on: bool) -> None:
        """Put the trained modules into training mode (on) or back into eval mode."""

    def after_training(self) -> None:
        """After the last step and its checkpoint (validation, final metrics)."""

    def finish(self, start: int):
        raise NotImplementedError

    def _on_step(self, step: int, loss: float) -> None:
        """After each optimizer step (validation or metrics every N steps)."""

    # ------------------------------------------------------------ one step
    def step(self, step: int) -> float:
        s = self.settings
        host.check_cancel()
        total = 0.0
        for micro in range(s.gradient_accumulation):
            loss = self.micro_batch_loss(step, micro)
            self.precision.backward(loss / s.gradient_accumulation)
            total += float(loss.detach()) / s.gradient_accumulation
        params = [p for p in self.trainable.values() if p.grad is not None]
        if self.world.size > 1:  # every rank holds the same weights: average the gradients and the loss
            loss_t = torch.tensor([total], device=self.device)
            self.world.mean_([p.grad for p in params] + [loss_t])
            total = float(loss_t)
        if self.precision.step(self.optimizer, params, s.max_grad_norm):
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # ------------------------------------------------------------ run
    def run(self):
        s = self.settings
        with host.training_mode():
            if s.resume == "restart":
                self.loop.clear()
            start = self.loop.resume()
            self.train_mode(True)
            try:
                self.loop.run(self.step)
            finally:
                self.train_mode(False)
            if not self.loop.checkpoints() or self.loop.checkpoints()[-1].name != f"step_{s.steps:06d}.pt":
                self.loop.save_checkpoint(s.steps)  # a rerun of a finished run returns at once
            for p in self.trainable.values():
                p.requires_grad_(False)
            self.after_training()
        return self.finish(start)

    # ------------------------------------------------------------ exports
    def base_metadata(self) -> dict:
        s = self.settings
        return {"ss_base_model_hash": self.bundle.base_hash, "ss_base_family": self.bundle.family,
                "ss_tokens": self.tokens, "ss_steps": len(self.loop.losses), "ss_seed": s.seed,
                "ss_network_dim": s.rank, "ss_network_alpha": s.alpha, "unconfused_trainer": self.kind,
                "unconfused_version": __version__, **presets.export_metadata(s)}

    def metadata(self) -> dict:
        return self.base_metadata()

    def export_embeddings(self, name: str) -> dict[str, Path]:
        """Each token -> models/embeddings/<name>_<token>.safetensors, with the family's keys."""
        out: dict[str, Path] = {}
        folder = first_folder("embeddings")
        family = self.bundle.spec
        for token in self.tokens:
            stem = f"{name}_{safe_name(token.strip('<>'), input='token')}"
            meta = dict(self.metadata(), ss_tokens=[token], unconfused_class_word=self.class_words.get(token, ""))
            out[f"embedding:{token}"] = save_embedding(folder / f"{stem}.safetensors",
                                                       family.embedding_state(self.bundle, token), self.bundle.family,
                                                       metadata=meta)
        return out
