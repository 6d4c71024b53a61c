"""The multi-concept sampler node, with the confusion debugger (per-token attention maps)."""

from __future__ import annotations

from ..engine.models import sampling as S
from ..engine.data.concepts import pil_to_tensor
from .common import CATEGORY, MODEL_BUNDLE, save_previews


class UnconfusedSample:
    """Draws the concepts together from a trained model bundle. With debug_attention, shows where
    each concept token's cross-attention went (one map per token, the paper's Figure 10 view)."""

    NODE_ID = "UnconfusedSample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_BUNDLE, {"tooltip": "A trained model bundle (LoRA trainer, CLIF, mask EM) or a "
                                                    "plain loaded one"}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "a photo of <alice> hugging <my-dog> on a beach",
                                      "tooltip": "Use the concept tokens, e.g. <alice>"}),
                "negative": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": S.PAPER_NEGATIVE,
                                        "tooltip": "The papers' negative prompt by default"}),
                "scheduler": (S.SCHEDULERS, {"default": "ddpm", "tooltip": "DDPM 50 steps is CLIF's setting"}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1}),
                "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8}),
                "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Image i uses seed + i"}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05}),
                "debug_attention": ("BOOLEAN", {"default": False, "tooltip": "Capture each concept token's "
                                                "cross-attention map (small extra cost)"}),
            },
            "optional": {
                "device": (["auto", "cuda", "cpu", "mps"], {"default": "auto"}),
            },
        }

    RETURN_TYPES = ("IMAGE", "LATENT", "MASK", "IMAGE", "STRING")
    RETURN_NAMES = ("images", "latent", "attention_masks", "attention_preview", "info")
    FUNCTION = "sample"
    CATEGORY = f"{CATEGORY}/sample"
    OUTPUT_NODE = True

    def sample(self, model, prompt, negative, scheduler, steps, cfg, width, height, seed, batch_size, lora_strength,
               debug_attention, device="auto"):
        import torch

        r = S.sample(model, prompt, negative=negative, scheduler=scheduler, steps=steps, cfg=cfg, width=width,
                     height=height, seed=seed, batch_size=batch_size, lora_strength=lora_strength,
                     debug_attention=debug_attention, device=device)
        # ComfyUI's LATENT holds the VAE's raw latents; its model scales them itself
        latent = {"samples": r.latents / model.vae.config.scaling_factor}
        if r.maps is not None:
            masks = r.maps.reshape(-1, height, width)  # image-major: image 0's tokens, then image 1's ...
            preview = pil_to_tensor(r.overlay())[None]
        else:
            masks = torch.zeros(1, height, width)
            preview = r.images[:1]
        info = "\n".join([f"{batch_size} image(s), seeds {seed}..{seed + batch_size - 1}, {scheduler} {steps} steps"]
                         + ([f"attention masks: {len(r.tokens)} per image, in order {', '.join(r.tokens)}"]
                            if r.maps is not None else []) + r.warnings)
        shown = [preview[0]] if r.maps is not None else []
        ui = {"images": save_previews(list(r.images) + shown, "unconfused_sample"), "text": [info]}
        return {"ui": ui, "result": (r.images, latent, masks, preview, info)}


NODE_CLASS_MAPPINGS = {UnconfusedSample.NODE_ID: UnconfusedSample}
NODE_DISPLAY_NAME_MAPPINGS = {UnconfusedSample.NODE_ID: "Multi-Concept Sampler (Unconfused)"}
