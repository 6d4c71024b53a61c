"""LoRA trainer: the concept token rows plus one UNet LoRA shared by all concepts.

CLIF's second stage (paper 4.3), DreamBooth-LoRA with SID captions, and the mask-EM method
all train this way: the text encoder is frozen (it may be CLIF's fine-tuned one), the new
token rows learn at their own rate, a peft LoRA sits on the UNet attention projections, and
the model's own objective (epsilon or v) is taken only inside the concept masks when masks
are known. Shaped like diffusers' train_dreambooth_lora.py, plus what a user's long run
needs: cached latents, checkpoints with exact resume, Cancel, validation images, exports
stock ComfyUI loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..engine import host, messages, presets
from ..engine.models import losses as L
from ..engine.data.concepts import ConceptSet
from ..engine.errors import UnconfusedError
from ..engine.models.exports import export_name, save_lora
from ..engine.models.families import Conditioning
from ..engine.files import atomic_save_image, safe_name
from ..engine.preview import grid, line_chart
from ..engine.settings import check_declared, setting
from ..engine.models.loading import add_text_encoder_lora
from ..engine.models.concept_tokens import add_concept_tokens, concept_embedding
from ..engine.data.training_examples import (
    ASPECTS,
    DEFAULT_TEMPLATE,
    Example,
    examples_from_concept_set,
    prepare,
)
from .base import LR_SCHEDULERS, OPTIMIZERS, PRECISIONS, RESUME  # noqa: F401 (the nodes' and CLI's choices)
from .base import TrainerCore, check_common, first_folder, make_optimizer, run_trainer
from .loop import settings_from_dict

log = logging.getLogger("unconfused")
NODE = "UnconfusedTrainLoRA"
UNET_TARGETS = "to_q,to_k,to_v,to_out.0"
TEXT_TARGETS = "q_proj,k_proj,v_proj,out_proj"

CAPTIONS = ["auto", "template"]
# settings that do not change what is trained: a resume may differ in these
NOT_HASHED = {"checkpoint_every", "keep_checkpoints", "validation_every", "validation_prompts", "validation_steps",
              "validation_seed", "resume", "export", "device", "name", "preset"}  # preset: its values are hashed


@dataclass
class LoraSettings:
    name: str = setting("unconfused", tip='Run name: the run folder under output/unconfused/runs and the exported '
                                          'file names. Same name + same settings = resume')
    preset: str = setting("custom", choices=presets.choices("lora"), tip='custom: the widgets as they are. paper: '
        "the paper's recipe; quick: a budget that finishes well under an hour on a 12 GB GPU. With a preset, the "
        'preset sets every setting it lists except a widget you changed from its default: that value wins '
        "(docs/presets.md lists the values and their sources). paper = CLIF stage 2; paper-sid = the SID paper's "
        'DreamBooth')
    steps: int = setting(800, min=1, ui_max=100000, tip='Optimizer steps')
    resolution: int = setting(512, min=64, ui_max=2048, step=64, tip='Training size: photos train at about this x '
        'this pixels, at their own aspect ratio (see aspect); 512 for SD1, 768 for SD2-v, 1024 for SDXL')
    batch_size: int = setting(1, min=1, ui_max=64, tip='Images per step')
    gradient_accumulation: int = setting(1, min=1, ui_max=64, tip='Batches per optimizer step')
    rank: int = setting(8, min=1, ui_max=256, tip='LoRA rank')
    alpha: float = setting(8.0, min=0.1, ui_max=512, step=0.1, tip='LoRA alpha (scale = alpha / rank)')
    dropout: float = setting(0.0, min=0.0, ui_max=0.9, step=0.01, tip='LoRA dropout')
    target_modules: str = setting(UNET_TARGETS, tip='UNet modules that get LoRA (comma separated)')
    unet_lr: float = setting(1e-4, min=0.0, ui_max=0.1, step=1e-05, tip='Learning rate of the UNet LoRA')
    token_lr: float = setting(2e-4, min=0.0, ui_max=0.1, step=1e-05, tip='Learning rate of the concept token rows')
    train_tokens: bool = setting(True)
    vectors_per_token: int = setting(1, min=1, ui_max=16, tip='Embedding vectors per concept token')
    text_encoder_lora: bool = setting(False, tip='Also a LoRA on the text encoder (leave off after CLIF)')
    text_encoder_lr: float = setting(5e-5, min=0.0, ui_max=0.1, step=1e-06, tip='Text-encoder LoRA learning rate')
    captions: str = setting("auto", choices=CAPTIONS, tip="auto: the concepts' own (e.g. SID) captions where "
                                                          'present, else the template')
    template: str = setting(DEFAULT_TEMPLATE, tip="Caption of a photo without its own: {token} and {class_word} "
                                                  "are filled in")
    masked_loss: bool = setting(True, tip="Use the concepts' masks: the loss only counts inside them")
    mask_normalize: str = setting("mask_area", choices=L.MASK_NORMALIZE, tip='mask_area: every concept weighs the '
        'same; image_area: small concepts weigh less')
    prior_preservation: bool = setting(False, tip='Also train on class images made by the base model (cached)')
    prior_weight: float = setting(1.0, min=0.0, ui_max=10.0, step=0.05, tip='Weight of the prior loss')
    class_images: int = setting(50, min=1, ui_max=1000, tip='Class images per class word')
    min_snr_gamma: float = setting(0.0, min=0.0, ui_max=20.0, step=0.5, tip='Min-SNR weighting (0 = off, 5 usual)')
    noise_offset: float = setting(0.0, min=0.0, ui_max=1.0, step=0.01, tip='Noise offset (0 = off)')
    flip: bool = setting(True, tip='Random horizontal flips')
    cache_latents: bool = setting(True, tip='Encode the photos once')
    precision: str = setting("auto", choices=PRECISIONS, tip='Frozen weights: auto = bf16/fp16 on a GPU, fp32 on the '
        'CPU; trained weights stay fp32; fp16 adds a gradient scaler')
    gradient_checkpointing: bool = setting(False, tip='Less GPU memory, ~30% slower')
    optimizer: str = setting("adamw", choices=OPTIMIZERS, tip="adamw8bit needs bitsandbytes and a CUDA GPU")
    lr_scheduler: str = setting("constant", choices=LR_SCHEDULERS, tip="Learning-rate schedule")
    warmup_steps: int = setting(0, min=0, ui_max=100000, tip='Learning-rate warm-up steps')
    max_grad_norm: float = setting(1.0)
    seed: int = setting(0, min=0, ui_max=2147483647, tip='Seeds data order, noise and timesteps')
    checkpoint_every: int = setting(100, min=0, ui_max=100000, tip='Save a resumable checkpoint every N steps (0 = '
        'only on Cancel or at the end)')
    keep_checkpoints: int = setting(2)
    validation_every: int = setting(0, min=0, ui_max=100000, tip='Validation images every N steps (0 = only at the '
        'end)')
    validation_prompts: list[str] = setting([], lines=True, tip='One prompt per line, using the tokens, e.g. <alice> '
        'hugging <my-dog>')
    validation_steps: int = setting(25)
    validation_seed: int = setting(0)
    resume: str = setting("auto", choices=RESUME, tip="auto: continue from the run's last checkpoint when the "
                                                      'settings match; restart: start over')
    export: bool = setting(True, tip='Write the LoRA to models/loras and the tokens to models/embeddings')
    device: str = setting("auto", choices=host.DEVICE_CHOICES, tip='auto: the GPU ComfyUI uses (cuda or mps), else the CPU')
    aspect: str = setting("buckets", choices=ASPECTS, tip="buckets: each photo trains at the size of about resolution x "
        "resolution pixels nearest its own shape (e.g. 640x384 for a 3:2 photo at 512), its masks with it; square: "
        "a centre crop of resolution x resolution (as before buckets; square photos: the same)")

    @classmethod
    def from_dict(cls, data: dict) -> "LoraSettings":
        return settings_from_dict(cls, data)

    def validated(self) -> "LoraSettings":
        def bad(input: str, msg: str):
            raise UnconfusedError(msg, input=input)

        check_common(self, ("unet_lr", "token_lr", "text_encoder_lr"))
        if self.resolution < 64 or self.resolution % 64:
            bad("resolution", f"must be a multiple of 64 (got {self.resolution}); 512 for SD1, 768 for SD2-v")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            bad("batch_size", "batch size and gradient accumulation must be at least 1")
        if "{token}" not in self.template:
            bad("template", "must contain {token} (e.g. 'a photo of {token} {class_word}')")
        if not [t for t in self.target_modules.split(",") if t.strip()]:
            bad("target_modules", f"name at least one module, e.g. {UNET_TARGETS}")
        check_declared(self)
        return self

    def hashed(self) -> dict:
        # `aspect` is hashed through what it does (the run config's training sizes), so runs of
        # square photos made before buckets existed still resume
        return {k: v for k, v in asdict(self).items() if k not in NOT_HASHED and k != "aspect"}


@dataclass
class LoraResult:
    bundle: object  # the trained ModelBundle (LoRA attached, tokens added)
    losses: list[float]
    run_dir: Path
    exports: dict[str, Path] = field(default_factory=dict)
    validation: torch.Tensor | None = None  # [B,H,W,3] of the last validation
    loss_curve: object = None  # PIL image
    resumed_from: int = 0

    def info(self) -> str:
        lines = [f"trained {len(self.losses)} steps (resumed from {self.resumed_from})" if self.resumed_from else
                 f"trained {len(self.losses)} steps",
                 f"final loss (mean of last 20): {sum(self.losses[-20:]) / max(len(self.losses[-20:]), 1):.4f}"]
        if "lora" in self.exports:
            lines.append(f"LoRA: models/loras/{self.exports['lora'].name} (stock LoraLoader)")
        for key, path in self.exports.items():
            if key.startswith("embedding:"):
                lines.append(f"{key[len('embedding:'):]} -> write embedding:{path.stem} in stock ComfyUI prompts")
        return "\n".join(lines)


# ---------------------------------------------------------------- helpers
def data_fingerprint(examples: list[Example]) -> str:
    """What the run trains on, so a resume never continues on different photos or captions."""
    h = hashlib.sha256()
    for e in examples:  # the tensors' bytes: a float sum would change with the CPU's thread count
        h.update(e.caption.encode() + b"\0")
        for t in (e.image, e.mask):
            if t is None:
                h.update(b"-")
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            if isinstance(t, torch._subclasses.FakeTensor):
                continue  # (the memory plan's fake photos have no bytes; no run folder resumes on them)
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def class_image_examples(bundle, classes: list[str], settings: LoraSettings, folder: Path) -> list[Example]:
    """Prior-preservation images of each class word, made by the base model once and cached."""
    from PIL import Image

    from ..engine.data.concepts import pil_to_tensor
    from ..engine.models.sampling import generate

    out = []
    for class_word in classes:
        sub = folder / f"{bundle.base_hash}_{safe_name(class_word, input='class_word')}_{settings.resolution}"
        sub.mkdir(parents=True, exist_ok=True)
        prompt = f"a photo of a {class_word}"
        for i in range(settings.class_images):
            path = sub / f"{i:04d}.png"
            if not path.is_file():
                img = generate(bundle, [prompt], steps=settings.validation_steps, cfg=7.5, width=settings.resolution,
                               height=settings.resolution, seeds=[settings.seed * 100003 + i],
                               desc=f"class images: {class_word} {i + 1}/{settings.class_images}")
                atomic_save_image(path, Image.fromarray((img[0].numpy() * 255).round().astype("uint8")))
            with Image.open(path) as im:
                out.append(Example(pil_to_tensor(im.convert("RGB")), prompt, None, []))
    return out


def _optimizer(params: list[dict], name: str):
    return make_optimizer(params, name, 1e-2)


@contextlib.contextmanager
def _eval(*modules):
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


@dataclass
class Batch:
    """One drawn batch: what the diffusion loss needs, and what a subclass's extra loss needs."""

    latents: torch.Tensor  # [B, 4, h, w]
    masks: torch.Tensor | None  # [B, 1, h, w] loss mask, or None (whole image)
    captions: list[str]
    concept_masks: torch.Tensor | None = None  # [B, K, h, w] one mask per concept (mask EM)
    select: torch.Tensor | None = None  # [B, K] the concepts each caption names
    sizes: torch.Tensor | None = None  # [B, 4] original h, w, crop top, left (SDXL's size conditioning)


# ---------------------------------------------------------------- the trainer
class LoraTrainer(TrainerCore):
    """Set up once, then `run()`. Usable from Python, the CLI and the node.

    Hooks for subclasses (trainers/em.py): `draw_batch`, `get_noise_pred_and_target`, `call_unet`,
    `loss_scope`, `extra_loss`."""
    node = NODE

    kind = "lora"

    def __init__(self, bundle, data: ConceptSet | list[Example], settings: LoraSettings, *,
                 run_root: Path | None = None, class_words: dict[str, str] | None = None):
        super().__init__(settings, run_root=run_root)
        self.class_words = dict(class_words or {})  # token -> class word, for datasets
        with host.training_mode():
            self._setup(bundle, data)

    # ------------------------------------------------------------ setup
    def _setup(self, bundle, data) -> None:
        from peft import LoraConfig

        s = self.settings
        host.free_memory_for_training()
        bundle = bundle.clone()  # the input bundle stays as it was
        if isinstance(data, ConceptSet):
            specs = [(c.token, c.class_word) for c in data.concepts]
            examples = examples_from_concept_set(data, s.captions, s.template)
        else:
            examples = list(data)
            # a dataset names its tokens; their class words come from the concept set (or the model has them)
            specs = [(t, self.class_words.get(t, "")) for e in examples for t in e.tokens]
            missing = sorted({t for t, c in specs if not c and t not in bundle.added_tokens})
            if missing:
                raise UnconfusedError(f"the dataset's tokens {missing} are neither in the model nor in the concept "
                                      "set; connect the concept set the dataset was built from",
                                      input="dataset")
        if not s.masked_loss:
            examples = [Example(e.image, e.caption, None, e.tokens) for e in examples]
        self.examples = examples
        add_concept_tokens(bundle, list(dict.fromkeys(specs)), s.vectors_per_token)
        self.tokens = list(dict.fromkeys(t for t, _ in specs))
        self.class_words.update({t: c for t, c in specs if c})

        self.family = bundle.spec
        bundle.to(self.device, self.weight_dtype)  # frozen weights in the run's precision
        unet, vae = bundle.unet, bundle.vae
        encoders = self.family.encoders(bundle)
        for m in (unet, vae, *encoders.values()):
            m.requires_grad_(False)
        vae.eval()
        self.bundle = bundle
        self.train_mode(True)

        # prior preservation images are made by the base model, before any LoRA is attached
        self.prior = None
        if s.prior_preservation:
            with torch.no_grad(), _eval(unet, *encoders.values()):
                classes = sorted({c for c in self.class_words.values() if c})
                prior = class_image_examples(bundle, classes, s, host.output_dir() / "unconfused" / "class_images")
            self.prior = prepare(prior, s.resolution, vae=vae if s.cache_latents else None, flip=s.flip,
                                 device=self.device, dtype=self.weight_dtype, aspect=s.aspect)

        unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, init_lora_weights="gaussian",
                                    target_modules=[t.strip() for t in s.target_modules.split(",") if t.strip()]))
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": s.unet_lr}]
        for te in encoders.values():
            if s.text_encoder_lora:
                add_text_encoder_lora(te, LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                     init_lora_weights="gaussian",
                                                     target_modules=TEXT_TARGETS.split(",")))
                groups.append({"params": [p for n, p in te.named_parameters() if "lora_" in n],
                               "lr": s.text_encoder_lr})
            emb = concept_embedding(te)
            emb.new_rows.requires_grad_(s.train_tokens)
            if s.train_tokens:
                groups.append({"params": [emb.new_rows], "lr": s.token_lr})
        if s.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if s.text_encoder_lora:
                for te in encoders.values():
                    te.gradient_checkpointing_enable()
        trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
        for attr, te in encoders.items():
            trainable.update({f"{attr}.{n}": p for n, p in te.named_parameters() if p.requires_grad})
        self.configure_optimizer(trainable, groups, weight_decay=1e-2, warmup_steps=s.warmup_steps)
        self.scheduler = bundle.noise_scheduler()
        bar = host.progress(len(examples) * (2 if s.flip else 1), "caching latents") if s.cache_latents else None
        self.data = prepare(examples, s.resolution, vae=vae if s.cache_latents else None, flip=s.flip,
                            device=self.device, dtype=self.weight_dtype, progress=bar, aspect=s.aspect)
        if bar is not None:
            bar.close()
        self.generator = torch.Generator().manual_seed(s.seed)
        bundle.lora[s.name] = {"rank": s.rank, "alpha": s.alpha, "targets": s.target_modules,
                               "text_encoder": s.text_encoder_lora}
        config = {"settings": s.hashed(), "base": bundle.base_hash, "family": bundle.family,
                  "data": data_fingerprint(examples), "tokens": self.tokens}
        if any(w != h for w, h in self.data.sizes):  # (absent when all are square: as before buckets)
            config["sizes"] = [f"{w}x{h}" for w, h in self.data.sizes]
        self.make_loop(config, self.generator)
        self._ids: dict[str, torch.Tensor] = {}
        te_trains = s.train_tokens or s.text_encoder_lora
        self._cond: dict[str, Conditioning] | None = None if te_trains else {}
        self.validation: torch.Tensor | None = None
        self.validation_history: list[tuple[int, torch.Tensor]] = []

    def train_mode(self, on: bool) -> None:
        self.bundle.unet.train(on)
        for te in self.family.encoders(self.bundle).values():
            te.train(on and self.settings.text_encoder_lora)

    # ------------------------------------------------------------ hooks: one batch
    def draw(self, data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n indices into data's examples, all of one bucket, and their flips, drawn with the run's
        generator (this rank's share; every rank draws the same bucket). The bucket is drawn with
        probability proportional to its examples, so every example is as likely as without buckets."""
        g, w = self.generator, self.world
        groups = list(data.groups.values())
        pool = torch.arange(len(data))
        if len(groups) > 1:  # (one bucket draws nothing here: square runs draw as before buckets)
            sizes = torch.tensor([len(m) for m in groups], dtype=torch.float)
            pool = torch.tensor(groups[int(torch.multinomial(sizes, 1, generator=g))])
        idx = pool[w.mine(torch.randint(len(pool), (n * w.size,), generator=g), n)]
        flip = w.mine(torch.rand(n * w.size, generator=g) < 0.5, n) if self.settings.flip else \
            torch.zeros(n, dtype=torch.bool)
        return idx, flip

    def latents_of(self, data, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Latents [n,4,h,w] of examples of one bucket (cached, or encoded now with a sampled posterior)."""
        g, w, n = self.generator, self.world, len(idx)
        if data.latents is not None:
            lat = torch.stack([data.latents_flipped[i] if f else data.latents[i] for i, f in zip(idx.tolist(), flip)])
            return lat.to(self.device, self.weight_dtype)
        px = torch.stack([data.pixels[i].flip(-1) if f else data.pixels[i] for i, f in zip(idx.tolist(), flip)])
        vae = self.bundle.vae
        with torch.no_grad():
            dist = vae.encode(px.to(self.device, vae.dtype)).latent_dist  # (the VAE may stay fp32)
            noise = w.mine(torch.randn((n * w.size, *dist.mean.shape[1:]), generator=g), n).to(dist.mean)
            return ((dist.mean + dist.std * noise) * vae.config.scaling_factor).to(self.weight_dtype)

    def draw_batch(self, data, n: int) -> Batch:
        """n examples drawn with the run's generator: latents, loss masks or None, captions."""
        idx, flip = self.draw(data, n)
        captions = [data.captions[i] for i in idx.tolist()]
        lat = self.latents_of(data, idx, flip)
        masks = None
        if data.masks is not None and bool(data.has_mask[idx].any()):
            m = torch.stack([data.masks[i].flip(-1) if f else data.masks[i] for i, f in zip(idx.tolist(), flip)])
            masks = L.latent_mask(m, tuple(lat.shape[-2:])).to(self.device)
        geometry = data.geometry[idx] if getattr(data, "geometry", None) is not None else None
        return Batch(lat, masks, captions, sizes=geometry)

    def call_unet(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                  batch: Batch | None = None) -> torch.Tensor:
        return self.family.call_unet(self.bundle.unet, noisy, timesteps, cond, self.weight_dtype,
                                     sizes=None if batch is None else batch.sizes)

    def get_noise_pred_and_target(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise the latents at random timesteps; the UNet's prediction, the objective's target, the timesteps."""
        s, g, w = self.settings, self.generator, self.world
        latents = batch.latents
        b = latents.shape[0]
        noise = w.mine(torch.randn((b * w.size, *latents.shape[1:]), generator=g), b)
        if s.noise_offset:
            noise = noise + s.noise_offset * w.mine(torch.randn((b * w.size, latents.shape[1], 1, 1), generator=g), b)
        noise = noise.to(latents)
        t = w.mine(torch.randint(0, self.scheduler.config.num_train_timesteps, (b * w.size,), generator=g), b)
        t = t.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with self.precision.autocast():
            pred = self.call_unet(noisy, t, self.encode(batch.captions), batch)
        target = L.diffusion_target(self.scheduler, latents.float(), noise.float(), t, self.bundle.prediction_type)
        return pred, target, t

    def loss_scope(self, batch: Batch):
        """A context around one batch's forward pass (the mask EM captures attention in it)."""
        return contextlib.nullcontext()

    def extra_loss(self, batch: Batch, weight: float) -> torch.Tensor | None:
        """A loss added to the diffusion loss of a batch (the mask EM's attention loss)."""
        return None

    def batch_loss(self, batch: Batch, weight: float) -> torch.Tensor:
        s = self.settings
        with self.loss_scope(batch):
            pred, target, t = self.get_noise_pred_and_target(batch)
            per_sample = L.masked_mse(pred, target, batch.masks, s.mask_normalize)
            if s.min_snr_gamma:
                per_sample = per_sample * L.min_snr_weights(self.scheduler, t, s.min_snr_gamma,
                                                            self.bundle.prediction_type).to(per_sample)
            loss = per_sample.mean() * weight
            extra = self.extra_loss(batch, weight)
        return loss if extra is None else loss + extra

    def encode(self, captions: list[str]) -> Conditioning:
        """Text conditioning. Token ids are made once per caption; when nothing in the text
        encoder trains, its outputs are cached too (it is frozen and deterministic)."""
        from ..engine.models.concept_tokens import expand_prompt

        missing = [c for c in dict.fromkeys(captions) if c not in self._ids]
        if missing:
            ids = self.bundle.tokenize([expand_prompt(self.bundle, c) for c in missing])
            self._ids.update(zip(missing, ids))
        if self._cond is None:
            return self.family.encode_ids(self.bundle, torch.stack([self._ids[c] for c in captions]))
        missing = [c for c in dict.fromkeys(captions) if c not in self._cond]
        if missing:
            with torch.no_grad():
                out = self.family.encode_ids(self.bundle, torch.stack([self._ids[c] for c in missing]))
            self._cond.update(zip(missing, out.rows()))
        return Conditioning.cat([self._cond[c] for c in captions])

    def micro_batch_loss(self, step: int, micro: int) -> torch.Tensor:
        s = self.settings
        loss = self.batch_loss(self.draw_batch(self.data, s.batch_size), 1.0)
        if self.prior is not None:
            loss = loss + self.batch_loss(self.draw_batch(self.prior, s.batch_size), s.prior_weight)
        return loss

    # ------------------------------------------------------------ validation
    def _on_step(self, step: int, loss: float) -> None:
        s = self.settings
        if (s.validation_prompts and s.validation_every and step % s.validation_every == 0 and step < s.steps
                and self.world.is_main):
            self.validate(step)

    def validate(self, step: int) -> torch.Tensor:
        from ..engine.models.sampling import generate

        s = self.settings
        with torch.no_grad(), _eval(self.bundle.unet, *self.family.encoders(self.bundle).values()):
            imgs = generate(self.bundle, list(s.validation_prompts), steps=s.validation_steps,
                            width=s.resolution, height=s.resolution,
                            seeds=[s.validation_seed + i for i in range(len(s.validation_prompts))],
                            desc=f"validation at step {step}")
        sheet = grid([_pil(i) for i in imgs], [f"step {step}: {p}" for p in s.validation_prompts], cell=256)
        atomic_save_image(self.run_dir / "validation" / f"step_{step:06d}.png", sheet)
        messages.send_validation(self.node, step, list(s.validation_prompts), list(imgs))
        self.validation = imgs
        self.validation_history.append((step, imgs))
        return imgs

    # ------------------------------------------------------------ run
    def after_training(self) -> None:
        if self.settings.validation_prompts and self.world.is_main:
            self.validate(self.settings.steps)

    def finish(self, start: int) -> LoraResult:
        s = self.settings
        curve = line_chart(self.loop.losses, f"{self.node} loss ({s.name})")
        if self.world.is_main:
            atomic_save_image(self.run_dir / "loss.png", curve)
        result = LoraResult(self.bundle, list(self.loop.losses), self.run_dir, validation=self.validation,
                            loss_curve=curve, resumed_from=start)
        if s.export and self.world.is_main:
            result.exports = self.export()
        self.world.barrier()
        self.bundle.to("cpu")
        host.empty_cache()
        return result

    def metadata(self) -> dict:
        s = self.settings
        return dict(self.base_metadata(), ss_resolution=s.resolution, ss_prediction_type=self.bundle.prediction_type,
                    ss_masked_loss=s.masked_loss)

    def export(self) -> dict[str, Path]:
        """LoRA -> models/loras/<name>.safetensors; each token -> models/embeddings/<name>_<token>.safetensors."""
        s = self.settings
        name = export_name(s.name)
        out: dict[str, Path] = {}
        encoders = self.family.encoders(self.bundle) if s.text_encoder_lora else None
        out["lora"] = save_lora(first_folder("loras") / f"{name}.safetensors", self.bundle.unet, encoders,
                                alpha=s.alpha, metadata=self.metadata(), family=self.bundle.family)
        out.update(self.export_embeddings(name))
        return out


def _pil(img: torch.Tensor):
    from ..engine.data.concepts import tensor_to_pil

    return tensor_to_pil(img)


def train_lora(bundle, data, settings: LoraSettings | dict | None = None, **kwargs) -> LoraResult:
    """Train and export; `settings` as LoraSettings or a dict (the CLI's config file)."""
    return run_trainer(LoraTrainer, LoraSettings, settings, bundle, data, **kwargs)

