"""The foundation's end-to-end smoke job: load a model, define concepts, take one training step.

Later issues replace it with the real flow; it stays as the quickest check that a machine,
a checkpoint and a set of photos work together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine import host
from ..engine.data.concepts import (
    Concept,
    ConceptSet,
    concept_from_folder,
    load_concept_set,
    make_concept_set,
    save_concept_set,
    validate_token,
)
from ..engine.data.synthetic import synthetic_photos
from ..engine.models.demo import write_demo_diffusers_folder
from ..engine.errors import UnconfusedError
from ..engine.files import atomic_write_json
from ..engine.models.loading import ModelBundle, load_model


@dataclass
class ConceptSpec:
    folder: Path | None
    token: str
    class_word: str


@host.named("smoke")
def build_concepts(specs: list[ConceptSpec]) -> ConceptSet:
    concepts = []
    for i, s in enumerate(specs):
        if s.folder is None:
            token = validate_token(s.token, input="--concept")
            concepts.append(Concept(token=token, class_word=s.class_word, images=synthetic_photos(i)))
        else:
            concepts.append(concept_from_folder(s.folder, s.token, s.class_word, input="--concept"))
    return make_concept_set(concepts)


def one_training_step(bundle: ModelBundle, cs: ConceptSet, resolution: int = 64, seed: int = 0) -> dict:
    """A real denoising step on the concepts' photos: VAE-encode, add noise, predict, backprop,
    update the UNet once; returns the loss before and after on the same noise."""
    from ..engine.data.concepts import to_batch

    torch.manual_seed(seed)
    images = to_batch([img for c in cs.concepts for img in c.images], (resolution, resolution))
    prompts = [f"a photo of {c.token} {c.class_word}" for c in cs.concepts for _ in c.images]
    scheduler = bundle.noise_scheduler()
    with host.training_mode():
        pixels = images.permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            latents = bundle.vae.encode(pixels).latent_dist.mean * bundle.vae.config.scaling_factor
            context = bundle.encode_prompt(prompts)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if bundle.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        unet = bundle.unet
        params = [p for p in unet.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=1e-2)
        loss = F.mse_loss(unet(noisy, t, context).sample.float(), target.float())
        loss.backward()
        host.check_cancel()
        opt.step()
        with torch.no_grad():
            after = F.mse_loss(unet(noisy, t, context).sample.float(), target.float())
        unet.requires_grad_(False)
    return {"loss_before": loss.item(), "loss_after": after.item(), "batch": int(latents.shape[0]),
            "latent_shape": list(latents.shape)}


@host.named("smoke")
def run(workdir: Path, ckpt: Path | None, specs: list[ConceptSpec], resolution: int = 64) -> dict:
    """The whole smoke job; writes `<workdir>/report.json` and returns the report."""
    workdir = Path(workdir)
    host.configure(models_dir=workdir / "models", output_dir=workdir / "output", temp_dir=workdir / "temp")
    (workdir / "temp").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if ckpt is None:
        ckpt = write_demo_diffusers_folder(workdir / "models" / "diffusers" / "unconfused-demo")
    bundle = load_model(ckpt)
    t_load = time.perf_counter() - t0
    cs = build_concepts(specs)
    folder = save_concept_set(cs, workdir / "output" / "unconfused" / "concept_sets" / "smoke")
    cs = load_concept_set(folder)
    step = one_training_step(bundle, cs, resolution)
    report = {"model": bundle.name, "family": bundle.family, "prediction_type": bundle.prediction_type,
              "concepts": {c.token: {"class_word": c.class_word, "images": len(c.images)} for c in cs.concepts},
              "concept_set_folder": str(folder), "load_seconds": round(t_load, 2),
              "total_seconds": round(time.perf_counter() - t0, 2), **step}
    if not all(map(lambda v: v == v and abs(v) != float("inf"), (step["loss_before"], step["loss_after"]))):
        raise UnconfusedError(f"the training step produced a non-finite loss: {step}")
    atomic_write_json(workdir / "report.json", report)
    return report


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)
