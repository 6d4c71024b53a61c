"""Sampling from a model bundle with the family's diffusers pipeline (StableDiffusionPipeline for SD1/SD2).

Prompts are encoded by the bundle's family (so concept tokens and multi-vector tokens work) and
handed to the pipeline as embeddings. Each step checks Cancel and moves the progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import host
from ..errors import UnconfusedError
from .concept_tokens import unknown_tokens

# The papers' negative prompt (Mix-of-Show's, used by CLIF).
PAPER_NEGATIVE = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
                  "worst quality, low quality")
SCHEDULERS = ["ddpm", "ddim", "euler", "dpmpp_2m"]


def make_scheduler(name: str, config: dict, prediction_type: str):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler}.get(name)
    if cls is None:
        raise UnconfusedError(f"unknown scheduler {name!r}; use one of {SCHEDULERS}", input="scheduler")
    return cls.from_config(dict(config, prediction_type=prediction_type))


def check_prompt(bundle, prompt: str, *, input: str = "prompt") -> list[str]:
    """Refuse unknown concept tokens; return warnings (e.g. what a too-long prompt loses)."""
    unknown = unknown_tokens(bundle, prompt)
    if unknown:
        known = ", ".join(bundle.added_tokens) or "none - connect a trained model"
        raise UnconfusedError(f"the prompt uses {', '.join(unknown)}, which this model does not know (it knows: "
                              f"{known})", input=input)
    from .concept_tokens import expand_prompt

    ids = bundle.tokenizer(expand_prompt(bundle, prompt), add_special_tokens=True).input_ids
    limit = bundle.tokenizer.model_max_length
    if len(ids) > limit:
        cut = bundle.tokenizer.decode(ids[limit - 1:-1])
        return [f"{input}: the text encoder reads {limit - 2} tokens; this was cut: '{cut}'"]
    return []


@torch.no_grad()
def generate(bundle, prompts: list[str], *, negative: str = "", steps: int = 30, cfg: float = 7.5,
             width: int = 512, height: int = 512, seeds: list[int], scheduler: str = "ddim",
             device: torch.device | None = None, desc: str = "sampling", lora_strength: float = 1.0,
             attention_tokens: list[str] | None = None, return_latents: bool = False):
    """Images [B,H,W,3] in 0..1, one per (prompt, seed) pair, made in one batch; the same seed
    gives the same image alone or in a batch (each image has its own noise generator).

    With `attention_tokens`, also returns each token's cross-attention map averaged over the
    run (engine/vision/attention.py): [B, K, h, w], zero for a token its prompt does not hold.
    Returns (images, latents or None, maps or None) when `return_latents` or tokens are asked."""
    from ..vision.attention import AttentionCapture, token_position_mask

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if width % 8 or height % 8:
        raise UnconfusedError(f"width and height must be multiples of 8, got {width}x{height}", input="width")
    device = device or bundle.device
    family = bundle.spec
    pipe = family.pipeline(bundle, make_scheduler(scheduler, bundle.scheduler_config, bundle.prediction_type))
    pipe.set_progress_bar_config(disable=True)
    bar = host.progress(steps, desc)

    def on_step(_pipe, _i, _t, kwargs):
        bar.update()  # also where Cancel is noticed
        return kwargs

    dtype = bundle.dtype
    cond = bundle.condition(list(prompts)).to(dtype)
    uncond = bundle.condition([negative] * len(prompts)).to(dtype)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    shape = (bundle.unet.config.in_channels, height // 8, width // 8)
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
    capture = None
    if attention_tokens:
        capture = AttentionCapture(bundle.unet)
        pos = token_position_mask(bundle, list(prompts), list(attention_tokens))
        # diffusers runs [unconditional, conditional] in one batch under CFG: watch the conditional half
        capture.watch(torch.cat([torch.zeros_like(pos), pos]) if cfg > 1 else pos)
    scale = _lora_scale(bundle.unet, lora_strength)
    try:
        with scale, (capture if capture is not None else _nothing()), host.cancel_checks(bundle.unet, bundle.vae):
            out = pipe(**family.pipeline_inputs(cond, uncond), num_inference_steps=steps,
                       guidance_scale=cfg, height=height, width=width, latents=latents.to(device, dtype),
                       generator=gens, output_type="latent", callback_on_step_end=on_step).images
            images = decode(bundle, out)
    finally:
        bar.close()
    maps = None
    if capture is not None:
        maps = capture.maps()
        maps = maps[len(prompts):] if cfg > 1 else maps
    if return_latents or attention_tokens:
        return images, out.float().cpu(), maps
    return images


def decode(bundle, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode (one image at a time: the VAE's peak memory is the big one) -> [B,H,W,3] in 0..1."""
    vae = bundle.vae
    out = []
    for lat in latents:
        img = vae.decode(lat[None].to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        out.append(((img.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))
    return torch.cat(out)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _lora_scale:
    """Scale the UNet's LoRA layers for one run (strength), then put them back."""

    def __init__(self, unet, strength: float):
        self.layers = []
        if strength != 1.0 and getattr(unet, "peft_config", None):
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.strength = strength

    def __enter__(self):
        for m in self.layers:
            m.scale_layer(self.strength)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.unscale_layer(None)  # back to the adapter's own alpha / rank
        return False


@dataclass
class SampleResult:
    images: torch.Tensor  # [B,H,W,3]
    latents: torch.Tensor  # [B,4,h,w], scaled as the UNet sees them
    tokens: list[str]  # the concept tokens the maps are for
    maps: torch.Tensor | None  # [B,K,H,W] normalised per map (0..1), zero for a token not in the prompt
    warnings: list[str]

    def overlay(self):
        """One cell per image: the picture with each token's map tinted in its colour."""
        from ..preview import PALETTE, grid, overlay_masks

        cells, labels = [], []
        for i, img in enumerate(self.images):
            cells.append(overlay_masks(img, list(self.maps[i])) if self.maps is not None else img)
            labels.append([(t, PALETTE[k % len(PALETTE)]) for k, t in enumerate(self.tokens)])  # colour swatches
        from ..data.concepts import tensor_to_pil

        return grid([c if not isinstance(c, torch.Tensor) else tensor_to_pil(c) for c in cells], labels,
                    cell=max(256, self.images.shape[2]), columns=4, caption_lines=2)
def sample(bundle, prompt: str, *, negative: str = PAPER_NEGATIVE, scheduler: str = "ddpm", steps: int = 50,
           cfg: float = 7.5, width: int = 512, height: int = 512, seed: int = 0, batch_size: int = 1,
           lora_strength: float = 1.0, debug_attention: bool = False, device: str = "auto") -> SampleResult:
    """The multi-concept sampler: `batch_size` images with seeds seed, seed+1, ...; optionally
    each concept token's cross-attention map (the confusion debugger)."""
    warnings = check_prompt(bundle, prompt, input="prompt")
    warnings += check_prompt(bundle, negative, input="negative")
    if batch_size < 1:
        raise UnconfusedError("must be at least 1", input="batch_size")
    # every concept the model knows gets a map: one the prompt does not name shows as empty
    tokens = list(bundle.added_tokens) if debug_attention else []
    if debug_attention and not tokens:
        warnings.append("debug_attention: the model has no concept tokens to show")
    dev = host.device(device)
    host.free_memory_for_training()
    original = (bundle.device, bundle.dtype)
    dtype = bundle.dtype if dev.type != "cpu" else torch.float32
    bundle.to(dev, dtype)
    try:
        images, latents, maps = generate(
            bundle, [prompt] * batch_size, negative=negative, steps=steps, cfg=cfg, width=width, height=height,
            seeds=[seed + i for i in range(batch_size)], scheduler=scheduler, device=dev, desc=host.current_node_name() or "sampling",
            lora_strength=lora_strength, attention_tokens=tokens or None, return_latents=True)
    finally:
        bundle.to(*original)
        host.empty_cache()
    if maps is not None:
        from ..vision.attention import AttentionCapture

        maps = torch.nn.functional.interpolate(maps.float().cpu(), size=(height, width), mode="bilinear",
                                               align_corners=False)
        maps = AttentionCapture.normalized(maps.clamp(min=0))
    return SampleResult(images, latents, tokens, maps, warnings)
