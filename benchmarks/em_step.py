"""Mask-EM step time against a plain LoRA step of the same trainer core, same model, images,
batch and resolution; and the mask re-estimation's share of a round (K steps + one re-estimation).

The model is benchmarks/lora_step.py's: SD 1.5's UNet / VAE / text encoder at a quarter of their
width (same depth, blocks, attention layout), so the captured 1/4-resolution layers weigh what they
weigh in SD 1.5. `--family sdxl`: SDXL's UNet and both text encoders at a quarter of their width (same
depth: 1/2/10 transformer blocks per level, 12 + 32 text layers; the same heads), so the captured level
(SDXL's 1/4-resolution level, 50 attention layers of 10-block stacks) weighs what it weighs in SDXL. The two trainers step alternately (EM, LoRA, EM, ...) so a busy machine slows both
alike; medians of the warm steps.

    .venv/bin/python benchmarks/em_step.py [--steps 8] [--resolution 256] [--batch 2] [--threads 1] [--device auto]
                                           [--first-timesteps 50] [--family sd1|sdxl] [--json PATH]

--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import headline, write_json


def _lora_bench():
    spec = importlib.util.spec_from_file_location("_lora_step_bench", Path(__file__).with_name("lora_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sdxl_bundle():
    """SDXL at a quarter of its width: UNet 80/160/320 channels with SDXL's 1/2/10 transformer blocks and
    its heads, CLIP-L 192 x 12 layers, bigG 320 x 32 layers with its projection, the size/crop conditioning."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from unconfused.engine.models import configs as cfg
    from unconfused.engine.models.loading import bundle_from_parts

    te = dict(cfg.SDXL_TEXT_ENCODER, hidden_size=192, intermediate_size=768, num_attention_heads=3,
              projection_dim=192)
    te2 = dict(cfg.SDXL_TEXT_ENCODER_2, hidden_size=320, intermediate_size=1280, num_attention_heads=5,
               projection_dim=320)
    unet = dict(cfg.SDXL_UNET, sample_size=32, block_out_channels=[80, 160, 320], cross_attention_dim=512,
                projection_class_embeddings_input_dim=6 * 256 + 320, norm_num_groups=16)
    torch.manual_seed(0)
    return bundle_from_parts(UNet2DConditionModel(**unet), AutoencoderKL(**dict(cfg.SDXL_VAE, block_out_channels=[
        32, 64, 128, 128])), CLIPTextModel(CLIPTextConfig(**te)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te2)), family="sdxl", name="bench-sdxl")


def scene_images(n: int, size: int = 320) -> list[torch.Tensor]:
    """Two synthetic concepts side by side per image (the trainers only need pixels)."""
    from unconfused.engine.data.synthetic import synthetic_photos

    a, b = synthetic_photos(0, n, size), synthetic_photos(1, n, size)
    return [torch.cat([x[:, size // 4: size // 4 + size // 2], y[:, size // 4: size // 4 + size // 2]], 1)
            for x, y in zip(a, b)]


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--reestimate-every", type=int, default=50)
    p.add_argument("--reestimate-timesteps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: on a shared machine several threads "
                   "spin-wait on each other and the timings mean little)")
    p.add_argument("--first-timesteps", type=int, default=50, help="timesteps of the first mask estimate (once "
                   "per run) that is timed too")
    p.add_argument("--family", choices=["sd1", "sdxl"], default="sd1", help="sd1: SD 1.5 at a quarter width; "
                   "sdxl: SDXL at a quarter width (its own attention level and both text encoders)")
    p.add_argument("--tmp", default="/tmp/unconfused-em-bench")
    p.add_argument("--json", help="also write the headline numbers as JSON to this path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from unconfused.engine import host
    from unconfused.engine.vision.attention import AttentionCapture
    from unconfused.engine.data.training_examples import Example
    from unconfused.trainers import em as E
    from unconfused.trainers.lora import LoraSettings, LoraTrainer

    bench = _lora_bench()
    make_bundle = sdxl_bundle if args.family == "sdxl" else bench.bundle
    tmp = Path(args.tmp)
    host.configure(models_dir=tmp / "models", output_dir=tmp / "out", temp_dir=tmp / "temp")
    dev = host.device(args.device)
    imgs = scene_images(args.images)
    common = dict(steps=10_000, resolution=args.resolution, batch_size=args.batch, resume="restart", export=False,
                  checkpoint_every=0, device=str(dev), precision="fp32", flip=True)
    scenes = E.make_scenes(imgs, "<a> dog\n<b> cat")
    em = E.EMTrainer(make_bundle(), scenes, E.EMSettings(name="bench-em", tokens_only_steps=0, reestimate_every=0,
                                                          init_timesteps=2, **common))
    # the LoRA trainer on the same images, captions naming both concepts, under the EM's first masks
    with host.training_mode():
        em._ensure_round(0)
    union = [F_up(em.rounds[0].masks[n].amax(0), args.resolution) for n in range(len(imgs))]
    lora = LoraTrainer(make_bundle(), [Example(img, "a photo of <a> and <b>", m, ["<a>", "<b>"])
                                        for img, m in zip(imgs, union)],
                       LoraSettings(name="bench-lora", **common), class_words={"<a>": "dog", "<b>": "cat"})
    times = {"lora": [], "em": [], "em_tokens_only": []}  # (wall, cpu) seconds per step
    em_step = {"em": 1, "em_tokens_only": 1}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(dev)
        times[name].append((time.perf_counter() - t0, time.process_time() - c0))

    def em_run(name):
        # phase 2 (tokens + LoRA) or phase 1 (token rows only), on the same trainer
        em.settings.tokens_only_steps = 0 if name == "em" else 10_000
        em.step(em_step[name])
        em_step[name] += 1

    with host.training_mode(), AttentionCapture(em.bundle.unet, em.layers, detach=False) as cap:
        em.capture = cap
        for i in range(args.steps):
            for name in ("em", "lora", "em_tokens_only", "lora"):
                timed(name, (lambda: lora.step(i)) if name == "lora" else (lambda n=name: em_run(n)))
        em.capture = None
        est = {}
        for t, crf in ((args.reestimate_timesteps, "latent"), (args.first_timesteps, "latent"),
                       (args.reestimate_timesteps, "image")):
            em.settings.crf_at = crf
            t0 = time.perf_counter()
            em.estimate(0, t)
            _sync(dev)
            est[(t, crf)] = time.perf_counter() - t0

    def med(xs, which):
        return statistics.median(x[which] for x in xs[min(2, len(xs) - 1):])

    lo, e, e1 = (med(times[n], 0) for n in ("lora", "em", "em_tokens_only"))
    clo, ce, ce1 = (med(times[n], 1) for n in ("lora", "em", "em_tokens_only"))
    k = args.reestimate_every
    print(f"Mask-EM step benchmark ({args.family}, {len(em.layers)} captured attention layers): {args.images} images of 2 concepts, batch {args.batch}, {args.resolution}px, "
          f"{args.steps} steps each (alternating), device {dev}, torch threads {torch.get_num_threads()}")
    print("| step | wall ms/step | x LoRA (wall) | CPU ms/step | x LoRA (CPU) |")
    print("|---|---|---|---|---|")
    print(f"| LoRA + tokens, masked loss (LoraTrainer) | {lo * 1000:.0f} | 1.00 | {clo * 1000:.0f} | 1.00 |")
    print(f"| EM phase 2: tokens + LoRA, union sampling, masked + attention loss | {e * 1000:.0f} | {e / lo:.2f} | "
          f"{ce * 1000:.0f} | {ce / clo:.2f} |")
    print(f"| EM phase 1: token rows only, masked + attention loss | {e1 * 1000:.0f} | {e1 / lo:.2f} | "
          f"{ce1 * 1000:.0f} | {ce1 / clo:.2f} |")
    print()
    print(f"| re-estimation ({args.images} images) | s | share of a round of K={k} EM steps + it |")
    print("|---|---|---|")
    for (t, crf), sec in est.items():
        print(f"| T={t} timesteps, CRF at {crf} size | {sec:.2f} | {sec / (k * e + sec) * 100:.1f}% |")
    print("(CPU = this process's CPU time: less sensitive than wall time to other jobs on a shared machine)")
    if args.json:
        t_re = est[(args.reestimate_timesteps, "latent")]
        write_json(args.json, {
            "benchmark": "em_step",
            "settings": {"family": args.family, "steps": args.steps, "resolution": args.resolution, "batch": args.batch,
                         "images": args.images, "device": str(dev), "threads": torch.get_num_threads(),
                         "reestimate_every": k, "reestimate_timesteps": args.reestimate_timesteps},
            "headline": [
                headline("phase2_wall", "EM phase 2 step (tokens + LoRA) vs LoRA trainer step, wall", e * 1000,
                         lo * 1000, "ms/step", e / lo, "x LoRA step"),
                headline("phase2_cpu", "EM phase 2 step vs LoRA trainer step, CPU time", ce * 1000, clo * 1000,
                         "ms/step", ce / clo, "x LoRA step"),
                headline("phase1_wall", "EM phase 1 step (token rows only) vs LoRA trainer step, wall", e1 * 1000,
                         lo * 1000, "ms/step", e1 / lo, "x LoRA step"),
                headline("reestimate_share", f"EM mask re-estimation (T={args.reestimate_timesteps}, CRF at latent "
                         f"size) share of a round of K={k} steps + it", t_re, k * e, "s",
                         quality=f"{t_re / (k * e + t_re) * 100:.1f}% of a round"),
            ],
            "details": {"ms_per_step": {"lora": [lo * 1000, clo * 1000], "em": [e * 1000, ce * 1000],
                                        "em_tokens_only": [e1 * 1000, ce1 * 1000]},
                        "reestimate_s": {f"T={t} crf={crf}": sec for (t, crf), sec in est.items()}},
        })


def F_up(mask: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(mask[None, None], size=(size, size), mode="nearest")[0, 0]


if __name__ == "__main__":
    main()
