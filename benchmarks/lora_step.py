"""LoRA trainer speed and memory against a reference loop written the way diffusers'
examples/dreambooth/train_dreambooth_lora.py does it (peft LoRA on to_q/k/v/out, VAE encode +
text encoder every step, plain MSE), on the same small UNet, batch and resolution.

Times come from one process running the variants' steps in interleaved rounds (so machine load
hits them alike); peak memory (CUDA: max allocated; CPU: peak RSS) from each variant run alone in
its own process. Prints a table; ratios, not absolute times, are the result.

    .venv/bin/python benchmarks/lora_step.py [--steps 30] [--resolution 128] [--device auto] [--json PATH]

--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import headline, run_child, write_json  # noqa: E402

# SD 1.5's UNet, VAE and text encoder at a quarter of their width (same depth, blocks and heads'
# size), so the VAE / UNet / text-encoder cost shares are those of the real model
UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[80, 160, 320, 320],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=192,
            attention_head_dim=8, norm_num_groups=16)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 128, 128], layers_per_block=2,
           latent_channels=4, norm_num_groups=32, sample_size=128, scaling_factor=0.18215)
TEXT = dict(vocab_size=49408, hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=3,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=192, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)
IMAGES = 8  # one "epoch"


def bundle():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unconfused.engine.models.loading import bundle_from_parts

    torch.manual_seed(0)
    return bundle_from_parts(UNet2DConditionModel(**UNET), AutoencoderKL(**VAE),
                             CLIPTextModel(CLIPTextConfig(**TEXT)), family="sd1", name="bench")


def photos():
    from unconfused.engine.data.concepts import Concept, make_concept_set
    from unconfused.engine.data.synthetic import synthetic_photos

    return make_concept_set([Concept("<a>", "dog", synthetic_photos(0, IMAGES // 2, 160)),
                             Concept("<b>", "cat", synthetic_photos(1, IMAGES // 2, 160))])


def reference(args, dev):
    """diffusers' dreambooth-LoRA training step, as that script writes it (returns a step function)."""
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from unconfused.engine.data.training_examples import examples_from_concept_set, fit_square

    b = bundle()
    unet, vae, te, tok = b.unet.to(dev), b.vae.to(dev), b.text_encoder.to(dev), b.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched = get_scheduler("constant", opt, num_warmup_steps=0, num_training_steps=args.steps)
    noise_scheduler = b.noise_scheduler()
    ex = examples_from_concept_set(photos())
    pixels = torch.stack([fit_square(e.image.permute(2, 0, 1), args.resolution) * 2 - 1 for e in ex])
    ids = tok([e.caption for e in ex], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    unet.train()

    def step():
        idx = torch.randint(len(ex), (args.batch,))
        px = pixels[idx].to(dev)
        if torch.rand(()) < 0.5:
            px = px.flip(-1)  # the script's RandomHorizontalFlip
        model_input = vae.encode(px).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), device=dev)
        noisy = noise_scheduler.add_noise(model_input, noise, t)
        ehs = te(ids[idx].to(dev))[0]
        pred = unet(noisy, t, ehs).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

    return step


def ours(args, dev, cache: bool, tokens: bool):
    from unconfused.engine import host
    from unconfused.trainers.lora import LoraSettings, LoraTrainer

    tmp = Path(args.tmp)
    host.configure(models_dir=tmp / "models", output_dir=tmp / "out", temp_dir=tmp / "temp")
    s = LoraSettings(name=f"bench-{cache}-{tokens}", steps=10**6, resolution=args.resolution,
                     batch_size=args.batch, cache_latents=cache, train_tokens=tokens, masked_loss=False,
                     resume="restart", export=False, checkpoint_every=0, device=str(dev), precision="fp32")
    tr = LoraTrainer(bundle(), photos(), s)
    return lambda: tr.step(0)


def stepper(args, dev, variant: str):
    if variant == "reference":
        return reference(args, dev)
    return ours(args, dev, cache=variant.startswith("ours-cached"), tokens=variant.endswith("tokens"))


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def child(args) -> None:
    """One variant alone for a few steps: its peak memory."""
    from unconfused.engine import host

    dev = host.device(args.device)
    torch.manual_seed(0)
    step = stepper(args, dev, args.variant)
    with host.training_mode():
        for _ in range(3):
            step()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"peak_mb": peak}))


VARIANTS = {
    "reference": "reference loop (VAE + text encoder every step)",
    "ours-uncached": "ours, same work (VAE every step, no token training)",
    "ours-cached": "ours, cached latents (no token training)",
    "ours-cached-tokens": "ours, cached latents + token rows training (default)",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--variant")
    p.add_argument("--tmp", default="/tmp/unconfused-bench")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1: on a busy "
                   "shared machine, threads spin-waiting on a descheduled peer skew the timings)")
    p.add_argument("--json", help="also write the headline numbers as JSON to this path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        return child(args)
    from unconfused.engine import host

    dev = host.device(args.device)
    rows = {}
    for v in VARIANTS:  # memory: each variant alone in its own process
        cmd = [sys.executable, __file__, "--variant", v, "--resolution", str(args.resolution), "--batch",
               str(args.batch), "--device", args.device, "--tmp", args.tmp, "--threads", str(args.threads)]
        out = run_child(cmd).strip().splitlines()[-1]
        rows[v] = json.loads(out)
    # time: all variants in this process, rounds interleaved, so machine load hits them alike
    torch.manual_seed(0)
    steps = {v: stepper(args, dev, v) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    with host.training_mode():
        for v, fn in steps.items():
            fn()  # warm-up
        for _ in range(args.steps):
            for v, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                times[v].append(time.perf_counter() - t0)
    for v in VARIANTS:
        rows[v]["step_ms"] = 1000 * statistics.median(times[v])
    ref = rows["reference"]
    steps_per_epoch = IMAGES / args.batch
    print(f"LoRA step benchmark: batch {args.batch}, {args.resolution}px, median of {args.steps} interleaved rounds, "
          f"device {args.device}, "
          f"epoch = {IMAGES} images")
    print("| variant | ms/step | x reference step | s/epoch | epoch speed-up | peak MB |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {VARIANTS[v]} | {r['step_ms']:.1f} | {r['step_ms'] / ref['step_ms']:.2f} | "
              f"{r['step_ms'] * steps_per_epoch / 1000:.2f} | {ref['step_ms'] / r['step_ms']:.2f}x | "
              f"{r['peak_mb']:.0f} |")
    if args.json:
        same, cached, tok = rows["ours-uncached"], rows["ours-cached"], rows["ours-cached-tokens"]
        write_json(args.json, {
            "benchmark": "lora_step",
            "settings": {"steps": args.steps, "resolution": args.resolution, "batch": args.batch,
                         "device": str(dev), "threads": torch.get_num_threads(), "images_per_epoch": IMAGES},
            "headline": [
                headline("step_same_work", "LoRA step, same work: ours vs diffusers dreambooth-LoRA loop",
                         same["step_ms"], ref["step_ms"], "ms/step", same["step_ms"] / ref["step_ms"],
                         "x reference step"),
                headline("epoch_cached", "LoRA epoch, cached latents vs reference loop",
                         cached["step_ms"] * steps_per_epoch / 1000, ref["step_ms"] * steps_per_epoch / 1000,
                         "s/epoch", ref["step_ms"] / cached["step_ms"], "epoch speed-up"),
                headline("epoch_cached_tokens", "LoRA epoch, cached latents + token rows (default) vs reference",
                         tok["step_ms"] * steps_per_epoch / 1000, ref["step_ms"] * steps_per_epoch / 1000,
                         "s/epoch", ref["step_ms"] / tok["step_ms"], "epoch speed-up"),
                headline("peak_memory", "LoRA peak memory, ours cached + tokens vs reference", tok["peak_mb"],
                         ref["peak_mb"], "MB", tok["peak_mb"] / ref["peak_mb"], "x reference"),
            ],
            "details": {v: dict(r, label=VARIANTS[v]) for v, r in rows.items()},
        })


if __name__ == "__main__":
    main()
