"""Sampling from a model bundle with diffusers' StableDiffusionPipeline.

Prompts are encoded by the bundle (so concept tokens and multi-vector tokens work) and
handed to the pipeline as embeddings. Each step checks Cancel and moves the progress bar.
"""

from __future__ import annotations

import torch

from . import host
from .errors import UnconfusedError
from .tokens import unknown_tokens

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


def check_prompt(bundle, prompt: str, *, node: str | None = None, input: str = "prompt") -> list[str]:
    """Refuse unknown concept tokens; return warnings (e.g. what a too-long prompt loses)."""
    unknown = unknown_tokens(bundle, prompt)
    if unknown:
        known = ", ".join(bundle.added_tokens) or "none - connect a trained model"
        raise UnconfusedError(f"the prompt uses {', '.join(unknown)}, which this model does not know (it knows: "
                              f"{known})", node=node, input=input)
    from .tokens import expand_prompt

    ids = bundle.tokenizer(expand_prompt(bundle, prompt), add_special_tokens=True).input_ids
    limit = bundle.tokenizer.model_max_length
    if len(ids) > limit:
        cut = bundle.tokenizer.decode(ids[limit - 1:-1])
        return [f"{input}: the text encoder reads {limit - 2} tokens; this was cut: '{cut}'"]
    return []


@torch.no_grad()
def generate(bundle, prompts: list[str], *, negative: str = "", steps: int = 30, cfg: float = 7.5,
             width: int = 512, height: int = 512, seeds: list[int], scheduler: str = "ddim",
             device: torch.device | None = None, desc: str = "sampling") -> torch.Tensor:
    """Images [B,H,W,3] in 0..1, one per (prompt, seed) pair; same seed -> same image."""
    from diffusers import StableDiffusionPipeline

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if width % 8 or height % 8:
        raise UnconfusedError(f"width and height must be multiples of 8, got {width}x{height}", input="width")
    device = device or bundle.device
    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                   unet=bundle.unet, scheduler=make_scheduler(scheduler, bundle.scheduler_config,
                                                                              bundle.prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    bar = host.progress(len(prompts) * steps, desc)

    def on_step(_pipe, _i, _t, kwargs):
        bar.update()
        return kwargs

    out = []
    dtype = bundle.dtype
    for prompt, seed in zip(prompts, seeds):
        cond = bundle.encode_prompt([prompt]).to(dtype)
        uncond = bundle.encode_prompt([negative]).to(dtype)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = torch.randn((1, bundle.unet.config.in_channels, height // 8, width // 8), generator=gen)
        img = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                   guidance_scale=cfg, height=height, width=width, latents=latents.to(device, dtype),
                   output_type="pt", callback_on_step_end=on_step).images
        out.append(img.float().cpu().permute(0, 2, 3, 1))
    bar.close()
    return torch.cat(out).clamp(0, 1)
