"""Cross-attention mask EM (Rahman et al., "Visual Concept-driven Image Generation"): learn concept
tokens and their latent masks together from one or a few images holding several concepts, with
no human masks.

The schedule of a run of `steps` optimizer steps (I = inversion_steps, P = tokens_only_steps):

    steps [0, I)        optional unmasked textual inversion: token rows only, whole image
    round 0 at step I   mask initialisation: each concept's cross-attention averaged over
                        `init_timesteps` random timesteps, divided by its maximum, thresholded
                        (fixed value or Otsu), overlaps given to the stronger map, DenseCRF with
                        the background as its own label -> one latent mask per concept per image
    steps [I, I+P)      phase 1: token rows only
    steps [I+P, steps)  phase 2: token rows + the UNet LoRA
    every K steps       round r: the masks re-estimated from the current tokens (and LoRA)
    step `steps`        a final round: the masks the run returns (with fixed_mask_stage, the last round
                        is at the end of phase 1 and phase 2 trains on those masks, fixed)

Each alternation step is Break-a-Scene's: union sampling (k of the image's concepts, prompt
"a photo of <a> and <c>"), masked diffusion loss on the union of their masks + attention_weight x
the cross-attention loss (each sampled token's map, divided by its maximum, against its mask, MSE),
image and masks flipped together. The training core (LoRA, token rows, cached latents, optimizer,
checkpoints with exact resume, Cancel, exports) is `LoraTrainer`; this module adds the masks through
its hooks: `draw_batch` (union sampling; the batch carries the per-concept masks), `loss_scope`
(attention capture around the UNet call) and `extra_loss` (the cross-attention loss).

Every round is kept (run folder `em_masks.pt`, PNGs under `masks/`), with its IoU against optional
ground-truth masks - the paper's Figure 3.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import host, messages, presets
from ..engine.vision.attention import AttentionCapture, token_position_mask
from ..engine.data.buckets import fit_to_bucket, unfit_from_bucket
from ..engine.data.concepts import tensor_to_pil, validate_token
from ..engine.vision.crf import CRFSettings, refine_latent_masks
from ..engine.errors import UnconfusedError
from ..engine.files import atomic_path, atomic_save_image
from ..engine.preview import PALETTE, grid, overlay_masks
from ..engine.settings import setting
from ..engine.data.training_examples import Example
from .base import run_trainer
from .loop import config_hash, seed_everything
from .lora import Batch, LoraResult, LoraSettings, LoraTrainer

log = logging.getLogger("unconfused")
NODE = "UnconfusedTrainMaskEM"
THRESHOLDS = ["otsu", "fixed"]
CRF_AT = ["latent", "image", "off"]
EM_TEMPLATE = "a photo of {token}"


# ---------------------------------------------------------------- settings
@dataclass
class EMSettings(LoraSettings):
    # shown by the EM node with its own meaning
    preset: str = setting("custom", choices=presets.choices("em"), tip='custom: the widgets as they are. paper: '
        "the paper's recipe; quick: a budget that finishes well under an hour on a 12 GB GPU. With a preset, the "
        'preset sets every setting it lists except a widget you changed from its default: that value wins '
        "(docs/presets.md lists the values and their sources). paper = Rahman et al. with Break-a-Scene's losses and "
        'phases')
    resolution: int = setting(512, min=64, ui_max=2048, step=64, tip='Training size: the images train at about this '
        'x this pixels, at their own aspect ratio (see aspect); 512 for SD1, 768 for SD2-v, 1024 for SDXL')
    unet_lr: float = setting(1e-4, min=0.0, ui_max=0.1, step=1e-05, tip='Learning rate of the UNet LoRA (phase 2)')
    flip: bool = setting(True, tip='Random horizontal flips of image and masks together')
    seed: int = setting(0, min=0, ui_max=2147483647, tip='Seeds sampling, noise, timesteps and the mask estimates')
    validation_prompts: list[str] = setting([], lines=True, tip='One prompt per line, using the tokens')

    # the EM's own
    name: str = setting("unconfused-em", tip='Run name: the run folder under output/unconfused/runs and the exported '
                                             'file names. Same name + same settings = resume')
    steps: int = setting(400, min=1, ui_max=100000, tip='Optimizer steps in all (paper: about 400)')
    token_lr: float = setting(5e-4, min=0.0, ui_max=0.1, step=1e-05, tip='Learning rate of the token rows')
    template: str = setting(EM_TEMPLATE, tip="Training prompt; {token} = the sampled tokens joined by 'and'")
    inversion_steps: int = setting(0, min=0, ui_max=100000, tip='Unmasked textual-inversion warm-up of the tokens '
        'before the first masks (0 = start from the class words)')
    tokens_only_steps: int = setting(100, min=0, ui_max=100000, tip='Phase 1: only the token rows train (after any '
        'warm-up); then token rows + LoRA')
    attention_weight: float = setting(1e-2, min=0.0, ui_max=10.0, step=0.001, tip='Weight of the cross-attention '
        "loss (each token's map vs its mask; Break-a-Scene 1e-2)")
    reestimate_every: int = setting(50, min=0, ui_max=100000, tip='Re-estimate the masks from the current tokens '
        'every K steps (0 = never: the masks of the first estimate stay)')
    fixed_mask_stage: bool = setting(False, tip='Phase 2 (token rows + LoRA) trains on the last masks of phase 1, '
        "fixed: the paper's final stage ('tokens and model jointly, keeping the mask fixed')")
    init_timesteps: int = setting(50, min=1, ui_max=1000, tip='Random timesteps the first masks average the '
        'attention over (paper: 50)')
    reestimate_timesteps: int = setting(10, min=1, ui_max=1000, tip='Timesteps of each later re-estimation')
    estimate_batch: int = setting(8, tip='timesteps per UNet call while estimating')
    threshold_mode: str = setting("otsu", choices=THRESHOLDS, tip='otsu: a threshold per map from its histogram; '
        'fixed: the threshold below')
    threshold: float = setting(0.45, min=0.01, ui_max=0.99, step=0.01, tip='Fixed threshold on each map divided by '
        'its maximum (0.35-0.55 usual)')
    crf_at: str = setting("image", choices=CRF_AT, tip='DenseCRF refinement at image size (sharper edges: IoU 0.97 '
        'vs 0.91 in benchmarks/crf_quality; ~3 s per image per round on a CPU), at latent size (fast), or off')
    crf_iterations: int = setting(10)
    crf_gaussian_sxy: float = setting(3.0, tip="CutLER's values, in image pixels")
    crf_gaussian_compat: float = setting(7.0)
    crf_bilateral_sxy: float = setting(50.0)
    crf_bilateral_srgb: float = setting(5.0)
    crf_bilateral_compat: float = setting(10.0)
    max_concepts_per_step: int = setting(0, min=0, ui_max=16, tip='Union sampling: at most this many concepts per '
        'training prompt (0 = up to all)')
    attention_layers: str = setting("", tip='comma separated attn2 module names; empty = the 1/4-resolution down/up '
                                            'layers')

    def validated(self) -> "EMSettings":
        def bad(input: str, msg: str):
            raise UnconfusedError(msg, input=input)

        if "{token}" not in self.template:
            bad("template", "must contain {token} (the sampled tokens, e.g. 'a photo of {token}')")
        if not 0 < self.threshold < 1:
            bad("threshold", "must be between 0 and 1 (maps are divided by their maximum; 0.35-0.55 is usual)")
        for name in ("inversion_steps", "tokens_only_steps", "reestimate_every", "max_concepts_per_step"):
            if getattr(self, name) < 0:
                bad(name, "must be 0 or more")
        for name in ("init_timesteps", "reestimate_timesteps", "estimate_batch"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.inversion_steps >= self.steps:
            bad("inversion_steps", f"the warm-up ({self.inversion_steps}) must be shorter than steps ({self.steps})")
        if self.attention_weight < 0:
            bad("attention_weight", "must be 0 or more (1e-2 is Break-a-Scene's)")
        if not self.masked_loss:
            bad("masked_loss", "the mask EM trains under its masks; use the LoRA trainer for unmasked training")
        self.crf_settings().validate()
        return super().validated()

    def crf_settings(self, scale: float = 1.0) -> CRFSettings:
        return CRFSettings(iterations=self.crf_iterations, gaussian_sxy=max(self.crf_gaussian_sxy * scale, 0.5),
                           gaussian_compat=self.crf_gaussian_compat,
                           bilateral_sxy=max(self.crf_bilateral_sxy * scale, 1.0),
                           bilateral_srgb=self.crf_bilateral_srgb, bilateral_compat=self.crf_bilateral_compat)

    @classmethod
    def from_dict(cls, data: dict) -> "EMSettings":
        return super().from_dict(data)


# ---------------------------------------------------------------- scenes: images with several concepts
@dataclass
class Scene:
    """One image holding several concepts (token -> class word), optionally with ground-truth masks
    (token -> [H, W]) used only to measure the estimated masks."""

    image: torch.Tensor  # [H, W, 3] in 0..1
    concepts: list[tuple[str, str]]
    ground_truth: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        return [t for t, _ in self.concepts]


_LINE = re.compile(r"^\s*(?:(\d+(?:\s*,\s*\d+)*)\s*:)?\s*(\S+)\s+(.+?)\s*$")


def parse_concept_lines(text: str, n_images: int, *, input: str = "concepts"
                        ) -> list[list[tuple[str, str]]]:
    """`<token> class word` per line: the concept is in every image. `2: <token> class` (or `1,3:`):
    only in those images (1-based). Returns per image its (token, class word) list, in line order."""
    per_image: list[list[tuple[str, str]]] = [[] for _ in range(n_images)]
    seen: dict[str, str] = {}
    lines = [ln for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise UnconfusedError("no concepts: write one line per concept, '<token> class word' (e.g. '<alice> woman'"
                              "), at least two for the mask EM to separate", input=input)
    for ln in lines:
        m = _LINE.match(ln)
        if not m:
            raise UnconfusedError(f"cannot read the line {ln.strip()!r}: write '<token> class word', e.g. "
                                  "'<alice> woman', or '2: <bob> man' for a concept only in image 2",
                                  input=input)
        where, token, class_word = m.groups()
        if not (token.startswith("<") and token.endswith(">")):
            raise UnconfusedError(f"line {ln.strip()!r}: the token comes first and is written in angle brackets, "
                                  f"e.g. '<{token.strip('<>')}> {class_word}'", input=input)
        token = validate_token(token, input=input)
        if token in seen:
            raise UnconfusedError(f"{token} is listed twice; one line per concept (use '1,2: {token} "
                                  f"{class_word}' for a concept in several images)", input=input)
        seen[token] = class_word
        images = list(range(n_images)) if where is None else [int(x) - 1 for x in where.split(",")]
        for i in images:
            if not 0 <= i < n_images:
                raise UnconfusedError(f"line {ln.strip()!r} names image {i + 1}, but there are {n_images} "
                                      "image(s); images are counted from 1", input=input)
            per_image[i].append((token, class_word))
    for i, cs in enumerate(per_image):
        if not cs:
            raise UnconfusedError(f"image {i + 1} has no concept; prefix lines with the images they belong to, "
                                  "or drop the image", input=input)
    return per_image
def make_scenes(images: list[torch.Tensor], concepts: str | list[list[tuple[str, str]]],
                ground_truth: list[torch.Tensor] | None = None) -> list[Scene]:
    """Scenes from images and the concept lines; ground truth (optional) is one mask per concept of
    each image, image-major, in line order."""
    per_image = parse_concept_lines(concepts, len(images)) if isinstance(concepts, str) else concepts
    scenes = [Scene(img, list(cs)) for img, cs in zip(images, per_image)]
    if ground_truth is not None:
        want = sum(len(s.concepts) for s in scenes)
        if len(ground_truth) != want:
            raise UnconfusedError(f"{len(ground_truth)} ground-truth masks, but the images hold {want} concepts; "
                                  "give one mask per concept of each image, image by image in the order of the "
                                  "concept lines", input="ground_truth")
        it = iter(ground_truth)
        for i, s in enumerate(scenes):
            for t in s.tokens:
                m = next(it)
                if tuple(m.shape[-2:]) != tuple(s.image.shape[:2]):
                    raise UnconfusedError(f"the ground-truth mask of {t} in image {i + 1} is {m.shape[-1]}x"
                                          f"{m.shape[-2]}, the image {s.image.shape[1]}x{s.image.shape[0]}; "
                                          "masks must have their image's size", input="ground_truth")
                s.ground_truth[t] = m.float().reshape(m.shape[-2:])
    if sum(len(s.concepts) for s in scenes) < 2 and len(scenes) == 1:
        log.warning("one concept in one image: the mask EM separates concepts from each other and the background")
    return scenes


# ---------------------------------------------------------------- mask estimation pieces
def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1] (between-class variance maximised over a histogram)."""
    v = values.detach().float().flatten().clamp(0, 1).cpu().numpy()
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centers)
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    k = int(np.argmax(between))
    return float(edges[k + 1])


def binarize(maps: torch.Tensor, mode: str = "otsu", threshold: float = 0.45) -> torch.Tensor:
    """maps [L,h,w], each divided by its maximum -> binary [L,h,w]: above the threshold (Otsu per map
    or fixed) and the strongest map at the pixel (a pixel goes to one concept; none = background)."""
    out = torch.zeros_like(maps)
    strongest = maps.argmax(0)
    for k, m in enumerate(maps):
        if float(m.max()) <= 0:
            continue
        thr = otsu_threshold(m) if mode == "otsu" else threshold
        above = m > thr
        mine = above & (strongest == k)
        out[k] = (mine if bool(mine.any()) else above).float()
    return out


def attention_loss(maps: torch.Tensor, masks: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
    """Break-a-Scene's cross-attention loss: maps [B,K,h,w] (captured, differentiable), each divided
    by its maximum, against masks [B,K,H,W] resized to the maps; MSE over the selected (b, k) pairs
    (select [B,K] bool; default all)."""
    b, k, h, w = maps.shape
    target = F.interpolate(masks.float().reshape(b * k, 1, *masks.shape[-2:]), size=(h, w),
                           mode="area").reshape(b, k, h, w)
    peak = maps.flatten(2).amax(-1)[..., None, None].clamp(min=1e-8)
    err = ((maps / peak - target.to(maps)) ** 2).mean(dim=(-2, -1))  # [B, K]
    if select is None:
        return err.mean()
    select = select.to(err.device)
    return (err * select).sum() / select.sum().clamp(min=1)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = float((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def unfit_square(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of the square centre crop for a mask [R,R]: back onto the original [H,W] (outside the crop = 0)."""
    return unfit_from_bucket(mask, height, width)


def per_image(masks: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Masks of N images, each [K,h,w]: one tensor [N,K,h,w] when they share a size (the usual),
    else the list (images at different aspect-ratio buckets). Either way `masks[n]` is image n's."""
    return torch.stack(masks) if len({tuple(m.shape) for m in masks}) == 1 else list(masks)


# ---------------------------------------------------------------- result
@dataclass
class MaskRound:
    index: int
    step: int  # optimizer steps done when the masks were made
    masks: torch.Tensor | list[torch.Tensor]  # [N, K, h, w] latent masks (0 where a concept is not in the
    # image); a list of [K, h_n, w_n] when the images train at different buckets (`per_image`)
    iou: dict[str, float] = field(default_factory=dict)  # token -> mean IoU over its images (with ground truth)
    seconds: float = 0.0


@dataclass
class EMResult(LoraResult):
    masks: list[torch.Tensor] = field(default_factory=list)  # per image [K_i, H, W] at the image's own size
    labels: list[str] = field(default_factory=list)  # "image i: <token>" per mask, image-major
    rounds: list[MaskRound] = field(default_factory=list)
    history: object = None  # PIL: the masks of every round over the images (rows = rounds)
    iou_curve: object = None  # PIL, with ground truth

    def mask_batch(self) -> torch.Tensor:
        """All masks as one MASK batch [sum K_i, H, W] (images of one size), image-major."""
        return torch.cat(self.masks).clamp(0, 1)

    def info(self) -> str:
        lines = [super().info(), f"mask rounds: {len(self.rounds)} (at steps {[r.step for r in self.rounds]})",
                 "masks output (in order): " + ", ".join(self.labels)]
        if self.rounds and self.rounds[-1].iou:
            first, last = self.rounds[0].iou, self.rounds[-1].iou
            lines.append("IoU with the ground truth, first -> last round: " + ", ".join(
                f"{t} {first[t]:.3f} -> {last[t]:.3f}" for t in last))
        return "\n".join(lines)


# ---------------------------------------------------------------- the trainer
class EMTrainer(LoraTrainer):
    """LoraTrainer whose masks come from its own cross-attention and improve as its tokens do."""
    node = NODE

    kind = "em"

    def __init__(self, bundle, scenes: list[Scene], settings: EMSettings, *, run_root: Path | None = None):
        if not scenes:
            raise UnconfusedError("no images: connect one or a few images holding the concepts",
                                  input="images")
        settings = settings.validated()
        self.scenes = scenes
        self.em_tokens = list(dict.fromkeys(t for s in scenes for t in s.tokens))
        class_words = {t: c for s in scenes for t, c in s.concepts}
        examples = [Example(s.image, settings.template.format(token=" and ".join(s.tokens)), None, s.tokens)
                    for s in scenes]
        seed_everything(settings.seed)  # the LoRA's random init: a resumed run's trainer starts like the first
        super().__init__(bundle, examples, settings, run_root=run_root, class_words=class_words)
        s = self.settings
        k = len(self.em_tokens)
        self.member = torch.zeros(len(scenes), k, dtype=torch.bool)  # [N, K]: concept k is in image n
        for n, sc in enumerate(scenes):
            for t in sc.tokens:
                self.member[n, self.em_tokens.index(t)] = True
        # each image trains at its aspect-ratio bucket (or the square crop): sizes (height, width)
        self.sizes = [(h, w) for w, h in self.data.sizes]
        self.latent_sizes = [(h // 8, w // 8) for h, w in self.sizes]
        self.images = [fit_to_bucket(sc.image, None, size)[0] for sc, size in zip(scenes, self.data.sizes)]
        self.gt = None  # per image [K, h, w] at its training size
        if any(sc.ground_truth for sc in scenes):
            self.gt = [torch.zeros(k, *size) for size in self.sizes]
            self.gt_known = torch.zeros(len(scenes), k, dtype=torch.bool)
            for n, sc in enumerate(scenes):
                for t, m in sc.ground_truth.items():
                    self.gt[n][self.em_tokens.index(t)] = fit_to_bucket(sc.image, m, self.data.sizes[n])[1]
                    self.gt_known[n, self.em_tokens.index(t)] = True
        names = [n.strip() for n in s.attention_layers.split(",") if n.strip()]
        self.layers = names or self.family.attention_layers(self.bundle.unet)
        self.lora_params = [p for n, p in self.trainable.items() if n.startswith("unet.")]
        self.rounds: list[MaskRound] = []
        self.masks: torch.Tensor | None = None  # [N, K, h, w] current latent masks
        self.capture: AttentionCapture | None = None
        self._positions: dict[tuple[str, ...], torch.Tensor] = {}
        self._history_checked = False
        self.history_path = self.run_dir / "em_masks.pt"
        self.reestimate_seconds = 0.0

    # ------------------------------------------------------------ schedule
    def round_steps(self) -> list[int]:
        """Steps (done) at which masks are made: the first after the warm-up, every K, the final one."""
        s = self.settings
        out = [s.inversion_steps]
        # the paper's final stage: tokens + model jointly on fixed masks, from the end of phase 1
        last = min(s.inversion_steps + s.tokens_only_steps, s.steps) if s.fixed_mask_stage else s.steps
        if s.reestimate_every:
            out += list(range(s.inversion_steps + s.reestimate_every, last, s.reestimate_every))
        return out + ([last] if last not in out else [])

    def phase(self, step: int) -> str:
        s = self.settings
        if step < s.inversion_steps:
            return "inversion"
        return "tokens" if step < s.inversion_steps + s.tokens_only_steps else "tokens+lora"

    # ------------------------------------------------------------ mask estimation (E step)
    @torch.no_grad()
    def estimate(self, step: int, timesteps: int) -> MaskRound:
        """Average each concept's cross-attention over `timesteps` random timesteps per image (own
        generator seeded by the run seed and the step: a resumed run re-makes the same masks),
        normalise, threshold, CRF -> per image [K, h, w] latent masks at its bucket's latent size."""
        import time

        s = self.settings
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        unet, n_train = self.bundle.unet, self.scheduler.config.num_train_timesteps
        was = unet.training
        unet.eval()
        out = [torch.zeros(len(self.em_tokens), *size) for size in self.latent_sizes]
        try:
            for n, sc in enumerate(self.scenes):
                latent = self._latent(n)
                caption = s.template.format(token=" and ".join(sc.tokens))
                cond1 = self.encode([caption]).detach()
                pos1 = token_position_mask(self.bundle, [caption], self.em_tokens)
                ts = torch.randint(0, n_train, (timesteps,), generator=g)
                noise = torch.randn((timesteps, *latent.shape[1:]), generator=g)
                size = self.latent_sizes[n]
                total = torch.zeros(len(self.em_tokens), *size)
                with AttentionCapture(unet, self.layers, detach=True) as cap:
                    for i in range(0, timesteps, s.estimate_batch):
                        host.check_cancel()
                        t = ts[i:i + s.estimate_batch].to(self.device)
                        b = t.shape[0]
                        noisy = self.scheduler.add_noise(latent.expand(b, -1, -1, -1),
                                                         noise[i:i + b].to(latent), t)
                        cap.reset()
                        cap.watch(pos1.expand(b, -1, -1))
                        with self.precision.autocast():
                            self.call_unet(noisy, t, cond1.expand(b))
                        total += cap.maps(size).sum(0).float().cpu()  # [K, h, w], summed over t
                maps = total / timesteps
                maps = AttentionCapture.normalized(maps[None])[0].cpu()
                idx = [self.em_tokens.index(t) for t in sc.tokens]
                out[n][idx] = self._refine(n, binarize(maps[idx], s.threshold_mode, s.threshold))
        finally:
            unet.train(was)
        out = per_image(out)
        r = MaskRound(len(self.rounds), step, out, seconds=time.perf_counter() - t0)
        r.iou = self.round_iou(out)
        return r

    def _refine(self, n: int, binary: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if s.crf_at == "off":
            return binary
        if s.crf_at == "latent":
            scale = self.latent_sizes[n][0] / self.sizes[n][0]  # kernel widths are given in image pixels
            return refine_latent_masks(self.images[n], binary, s.crf_settings(scale),
                                       image_input="images", mask_input="masks")
        from ..engine.vision.crf import refine

        up = F.interpolate(binary[None], size=self.sizes[n], mode="nearest")[0]
        fine = refine(self.images[n], up, s.crf_settings(), work_at="image", image_input="images",
                      mask_input="masks", on_degenerate="keep")
        return F.interpolate(fine[None], size=self.latent_sizes[n], mode="area")[0]

    def _latent(self, n: int) -> torch.Tensor:
        d = self.data
        if d.latents is not None:
            return d.latents[n][None].to(self.device, self.weight_dtype)
        vae = self.bundle.vae
        px = d.pixels[n][None].to(self.device, vae.dtype)  # (the VAE may stay fp32)
        return (vae.encode(px).latent_dist.mean * vae.config.scaling_factor).to(self.weight_dtype)

    def round_iou(self, masks) -> dict[str, float]:
        """token -> mean IoU (over the images where its ground truth is known) at each image's training size."""
        if self.gt is None:
            return {}
        up = [F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]
              for m, size in zip(masks, self.sizes)]
        out = {}
        for k, t in enumerate(self.em_tokens):
            vals = [iou(up[n][k], self.gt[n][k]) for n in range(len(self.scenes)) if self.gt_known[n, k]]
            if vals:
                out[t] = sum(vals) / len(vals)
        return out

    def _ensure_round(self, step: int) -> None:
        """Make the round due at this step (if any) unless it exists (resume)."""
        s = self.settings
        self._load_history(step)
        due = [rs for rs in self.round_steps() if rs <= step]
        if due and not any(r.step == due[-1] for r in self.rounds):
            first = due[-1] == s.inversion_steps
            r = self.estimate(due[-1], s.init_timesteps if first else s.reestimate_timesteps)
            r.index = len(self.rounds)
            self.rounds.append(r)
            self._save_round(r)
        self.masks = self.rounds[-1].masks if self.rounds and self.rounds[-1].step <= step else None

    # ------------------------------------------------------------ history on disk
    def _load_history(self, step: int) -> None:
        if self._history_checked:
            return
        self._history_checked = True
        if not self.history_path.is_file():
            return
        try:
            payload = torch.load(self.history_path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable: the rounds are made again (deterministically)
            log.warning("%s is unreadable (%s); the masks are estimated again", self.history_path.name, e)
            return
        if payload.get("config_hash") != config_hash(self.loop.config):
            return
        self.rounds = [MaskRound(int(r["index"]), int(r["step"]), r["masks"], dict(r["iou"]), float(r["seconds"]))
                       for r in payload["rounds"] if int(r["step"]) <= step]

    def _save_round(self, r: MaskRound) -> None:
        if not self.world.is_main:
            return
        payload = {"config_hash": config_hash(self.loop.config), "tokens": self.em_tokens,
                   "rounds": [{"index": x.index, "step": x.step, "masks": x.masks, "iou": x.iou, "seconds": x.seconds}
                              for x in self.rounds]}
        with atomic_path(self.history_path) as tmp:
            torch.save(payload, tmp)
        folder = self.run_dir / "masks" / f"round_{r.index:02d}_step_{r.step:06d}"
        for n, sc in enumerate(self.scenes):
            for t in sc.tokens:
                m = r.masks[n][self.em_tokens.index(t)]
                up = F.interpolate(m[None, None], size=self.sizes[n], mode="bilinear", align_corners=False)[0, 0]
                atomic_save_image(folder / f"image{n + 1}_{t.strip('<>')}.png", tensor_to_pil(up))
        messages.send_masks(self.node, r.step, self.images, [self._overlay_masks(r, n) for n in range(len(self.scenes))],
                            labels=[f"round {r.index} (step {r.step}): " + " ".join(sc.tokens) for sc in self.scenes],
                            force=True)

    def _overlay_masks(self, r: MaskRound, n: int) -> list[torch.Tensor]:
        return [r.masks[n][self.em_tokens.index(t)] for t in self.scenes[n].tokens]

    # ------------------------------------------------------------ one step (M step)
    def step(self, step: int) -> float:
        self._ensure_round(step)
        trains_lora = self.phase(step) == "tokens+lora"
        for p in self.lora_params:
            p.requires_grad_(trains_lora)
        return super().step(step)

    def draw_batch(self, data, n: int) -> Batch:
        """Union sampling: each drawn image gets k of its concepts (k uniform in 1..its count, capped by
        max_concepts_per_step); the prompt names them; the loss mask is the union of their masks; the
        image and its masks flip together. The batch carries the per-concept masks for the attention loss."""
        if data is not self.data:  # prior-preservation images: as the LoRA trainer
            return super().draw_batch(data, n)
        s, g, w = self.settings, self.generator, self.world
        idx, flip = self.draw(data, n)
        picks = w.mine(torch.rand(n * w.size, len(self.em_tokens), generator=g), n)
        counts = w.mine(torch.rand(n * w.size, generator=g), n)
        select = torch.zeros(n, len(self.em_tokens), dtype=torch.bool)
        captions = []
        for j, i in enumerate(idx.tolist()):
            member = self.member[i]
            have = int(member.sum())
            cap = min(have, s.max_concepts_per_step) if s.max_concepts_per_step else have
            k = 1 + int(counts[j] * cap) if self.masks is not None else have  # the warm-up names them all
            order = torch.where(member, picks[j], torch.full_like(picks[j], 2.0)).argsort()[:min(k, have)]
            select[j, order] = True
            toks = [t for kk, t in enumerate(self.em_tokens) if select[j, kk]]
            captions.append(s.template.format(token=" and ".join(toks)))
        lat = self.latents_of(data, idx, flip)
        if self.masks is None:  # warm-up: whole images, no attention loss
            return Batch(lat, None, captions)
        per = torch.stack([self.masks[i].flip(-1) if f else self.masks[i] for i, f in zip(idx.tolist(), flip)])
        per = F.interpolate(per, size=tuple(lat.shape[-2:]), mode="area") if per.shape[-2:] != lat.shape[-2:] else per
        union = (per * select[..., None, None]).amax(1, keepdim=True)
        # a concept whose mask is still empty would make the union empty: then the whole image counts
        empty = union.flatten(1).amax(1) <= 0
        union[empty] = 1.0
        return Batch(lat, union.to(self.device), captions, concept_masks=per.to(self.device), select=select)

    def _positions_for(self, captions: list[str]) -> torch.Tensor:
        key = tuple(captions)
        if key not in self._positions:
            if len(self._positions) > 256:
                self._positions.clear()
            self._positions[key] = token_position_mask(self.bundle, captions, self.em_tokens)
        return self._positions[key]

    def _attends(self, batch: Batch) -> bool:
        return batch.concept_masks is not None and self.capture is not None and self.settings.attention_weight > 0

    @contextlib.contextmanager
    def loss_scope(self, batch: Batch):
        """The capture watches this batch's concept tokens during its UNet call (and forgets them after)."""
        cap = self.capture
        if self._attends(batch):
            cap.reset()
            cap.watch(self._positions_for(batch.captions).to(self.device))
        try:
            yield
        finally:
            if cap is not None:
                cap.watch(None)
                cap.reset()

    def extra_loss(self, batch: Batch, weight: float) -> torch.Tensor | None:
        """Break-a-Scene's cross-attention loss of the sampled concepts against their masks."""
        if not self._attends(batch):
            return None
        return self.settings.attention_weight * weight * attention_loss(self.capture.maps(), batch.concept_masks,
                                                                         batch.select)

    # ------------------------------------------------------------ run
    def run(self) -> EMResult:
        s = self.settings
        if s.resume == "restart" and self.history_path.is_file():
            self.history_path.unlink()
        with host.training_mode(), AttentionCapture(self.bundle.unet, self.layers, detach=False) as cap:
            self.capture = cap
            try:
                base = super().run()
            finally:
                self.capture = None
        with host.training_mode():
            self._load_history(s.steps)
            if not any(r.step == s.steps for r in self.rounds):  # the final round (e.g. after a Cancel in it)
                self.bundle.to(self.device)
                try:
                    self._ensure_round(s.steps)
                finally:
                    self.bundle.to("cpu")
                    host.empty_cache()
        return self._result(base)

    def _on_step(self, step: int, loss: float) -> None:
        super()._on_step(step, loss)
        if step == self.settings.steps:
            self._ensure_round(step)  # the final masks, from the final tokens and LoRA

    def metadata(self) -> dict:
        s = self.settings
        return dict(super().metadata(), unconfused_trainer="em", ss_masked_loss="em",
                    unconfused_em_rounds=len(self.rounds), unconfused_em_attention_weight=s.attention_weight)

    def _result(self, base: LoraResult) -> EMResult:
        res = EMResult(**{f: getattr(base, f) for f in base.__dataclass_fields__})
        res.rounds = list(self.rounds)
        final = self.rounds[-1].masks
        for n, sc in enumerate(self.scenes):
            h, w = sc.image.shape[:2]
            ms = []
            for t in sc.tokens:
                up = F.interpolate(final[n][self.em_tokens.index(t)][None, None], size=self.sizes[n],
                                   mode="bilinear", align_corners=False)[0, 0]
                ms.append((unfit_from_bucket(up, h, w) > 0.5).float())
                res.labels.append(f"image {n + 1}: {t}")
            res.masks.append(torch.stack(ms))
        res.history = history_strip(self.images, [[self._overlay_masks(rd, n) for n in range(len(self.scenes))]
                                                  for rd in self.rounds],
                                    [f"round {rd.index} @ step {rd.step}" for rd in self.rounds])
        if self.world.is_main:
            atomic_save_image(self.run_dir / "mask_history.png", res.history)
        if self.gt is not None:
            res.iou_curve = iou_chart(self.rounds, f"mask IoU per round ({self.settings.name})")
            if self.world.is_main:
                atomic_save_image(self.run_dir / "iou.png", res.iou_curve)
        return res


# ---------------------------------------------------------------- pictures
def history_strip(images: list[torch.Tensor], rounds: list[list[list[torch.Tensor]]], labels: list[str],
                  cell: int = 160):
    """Rows = rounds, columns = images: each image with its concepts' masks tinted."""
    pics, caps = [], []
    for rd, label in zip(rounds, labels):
        for n, masks in enumerate(rd):
            pics.append(overlay_masks(images[n], list(masks)))
            caps.append(f"{label}, image {n + 1}")
    return grid(pics, caps, cell=cell, columns=len(images), caption_lines=2)


def iou_chart(rounds: list[MaskRound], title: str, width: int = 512, height: int = 256):
    """IoU with the ground truth per round, one line per concept (the paper's Figure 3)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((8, 4), title, fill=(235, 235, 235), font=font)
    left, top, right, bottom = 40, 20, width - 120, height - 22
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    steps = [r.step for r in rounds]
    lo, hi = min(steps), max(max(steps), min(steps) + 1)

    def xy(step: int, v: float):
        return left + (right - left) * (step - lo) / (hi - lo), bottom - (bottom - top) * v

    for v in (0.0, 0.5, 1.0):
        draw.text((4, xy(lo, v)[1] - 6), f"{v:.1f}", fill=(200, 200, 200), font=font)
    tokens = list(dict.fromkeys(t for r in rounds for t in r.iou))
    for k, t in enumerate(tokens):
        pts = [xy(r.step, r.iou[t]) for r in rounds if t in r.iou]
        color = PALETTE[k % len(PALETTE)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((right + 8, top + 14 * k), t, fill=color, font=font)
    draw.text((left, bottom + 4), f"step {lo} .. {hi}", fill=(200, 200, 200), font=font)
    return img


def train_em(bundle, scenes: list[Scene], settings: EMSettings | dict | None = None, **kwargs) -> EMResult:
    """Run the mask EM and export; `settings` as EMSettings or a dict (the CLI's config file)."""
    return run_trainer(EMTrainer, EMSettings, settings, bundle, scenes, **kwargs)


__all__ = ["EMSettings", "EMTrainer", "EMResult", "MaskRound", "Scene", "attention_loss", "binarize", "iou",
           "make_scenes", "otsu_threshold", "parse_concept_lines", "train_em"]
