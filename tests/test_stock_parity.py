"""Exports against stock ComfyUI code: the LoRA through LoraLoader's loader and the token
embeddings through `embedding:` give the same conditioning and UNet prediction as our trained
model, on the full-size SD 1.5 architecture (random weights, tiny resolution)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from comfy_stock import run_script
from tiny_models import cached_checkpoint
from unconfused.engine.data.concepts import Concept, make_concept_set
from unconfused.engine.models.loading import load_model
from unconfused.trainers.lora import LoraSettings, LoraTrainer
from unconfused.engine.data.synthetic import synthetic_photos

HERE = Path(__file__).resolve().parent


def run_stock(tmp_path: Path, job: dict) -> dict:
    return torch.load(run_script(HERE / "comfy_stock.py", tmp_path, job, 600, out="stock_out.pt"), weights_only=True)


def test_exported_lora_and_embeddings_match_stock_comfyui(tmp_path):
    ckpt = cached_checkpoint("sd1")
    cs = make_concept_set([Concept("<a>", "dog", synthetic_photos(0, 2, 64)),
                           Concept("<b>", "cat", synthetic_photos(1, 2, 64))])
    tr = LoraTrainer(load_model(ckpt), cs, LoraSettings(name="pets", steps=1, resolution=64, rank=4, alpha=2.0,
                                                        checkpoint_every=0, resume="restart"))
    tr.run()
    # stand in for a long training: strong LoRA weights and token rows, so a wrong key or scale shows
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tr.bundle.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        rows = tr.bundle.text_encoder.get_input_embeddings().new_rows
        rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)
    exports = tr.export()
    assert exports["embedding:<a>"].name == "pets_a.safetensors"

    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 421])
    torch.save({"x": x, "t": t}, tmp_path / "inputs.pt")
    ours_prompts = ["a photo of <a> dog", "<b> cat next to <a> dog on a beach"]
    stock_prompts = [p.replace("<a>", "embedding:pets_a").replace("<b>", "embedding:pets_b") for p in ours_prompts]
    stock = run_stock(tmp_path, {"ckpt": str(ckpt), "embeddings": str(exports["embedding:<a>"].parent),
                                 "lora": str(exports["lora"]), "lora_strength": 1.0, "prompts": stock_prompts,
                                 "inputs": str(tmp_path / "inputs.pt")})
    assert stock["lora_warnings"] == []  # every key of our file was loaded

    unet = tr.bundle.unet
    report = {}
    with torch.no_grad():
        for ours_p, stock_p in zip(ours_prompts, stock_prompts):
            cond = tr.bundle.encode_prompt([ours_p])
            pred = unet(x, t, cond.expand(2, -1, -1)).sample
            unet.disable_adapters()
            base = unet(x, t, cond.expand(2, -1, -1)).sample
            unet.enable_adapters()
            cond_err = float((cond - stock["cond"][stock_p]).abs().max())
            unet_err = float((pred - stock["unet"][stock_p]).abs().max())
            lora_effect = float((pred - base).abs().max())
            report[ours_p] = {"cond_max_abs_err": cond_err, "unet_max_abs_err": unet_err,
                              "lora_effect_max_abs": lora_effect, "unet_out_max_abs": float(pred.abs().max())}
            assert cond_err < 1e-4, report
            assert unet_err < 2e-4 * max(1.0, float(pred.abs().max())), report
            assert lora_effect > 100 * unet_err, report  # the comparison can see a LoRA that did not load
    # the token rows matter too: the plain class word gives a different conditioning
    with torch.no_grad():
        plain = tr.bundle.encode_prompt(["a photo of dog dog"])
    assert float((plain - stock["cond"][stock_prompts[0]]).abs().max()) > 100 * report[ours_prompts[0]]["cond_max_abs_err"]
    print(json.dumps(report, indent=1))
