"""Diffusion training losses: the model's own objective, masked, optionally min-SNR weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_NORMALIZE = ["mask_area", "image_area"]


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type}")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [B,H,W] (or [B,1,H,W]) resized to latent size by area averaging (soft edges)."""
    if mask.ndim == 3:
        mask = mask[:, None]
    return F.interpolate(mask.float(), size=size, mode="area").clamp(0, 1)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               normalize: str = "mask_area") -> torch.Tensor:
    """Per-sample MSE [B]. With a mask [B,1,h,w], pixels outside it contribute nothing:
    'mask_area' averages over the masked area (each concept weighs the same whatever its
    size), 'image_area' over the whole latent (small concepts weigh less)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    m = mask.to(err.dtype).expand_as(err)
    total = (err * m).sum(dim=(1, 2, 3))
    if normalize == "mask_area":
        return total / m.sum(dim=(1, 2, 3)).clamp(min=1e-6)
    if normalize == "image_area":
        return total / m[0].numel()
    raise ValueError(f"unknown mask normalisation {normalize}; use {MASK_NORMALIZE}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as diffusers' training examples compute them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)
