"""Sampler speed: seconds per sampling step of Unconfused's sampler (debugger off and on) vs
diffusers' StableDiffusionPipeline called directly, same model, prompt, scheduler, size.
Rounds alternate between the variants so machine load hits them alike. Prints a table.

    .venv/bin/python benchmarks/sample_step.py [--steps 20] [--size 128] [--rounds 3] [--json PATH]

--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("UNCONFUSED_QUIET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import bundle  # noqa: E402  (SD 1.5 proportions at quarter width)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the headline numbers as JSON to this path")
    args = p.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from unconfused.engine import host, sampling as S
    from unconfused.engine.tokens import add_concept_tokens

    host.configure(output_dir="/tmp/unconfused-bench", temp_dir="/tmp/unconfused-bench")
    b = bundle()
    add_concept_tokens(b, [("<a>", "dog"), ("<b>", "cat")])
    prompt = "a photo of <a> and <b> on a beach"
    pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=DDIMScheduler.from_config(b.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def reference():
        with torch.no_grad():
            cond, uncond = b.encode_prompt([prompt]), b.encode_prompt([""])
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                 height=args.size, width=args.size, generator=torch.Generator().manual_seed(0))

    def ours(debug: bool):
        return lambda: S.sample(b, prompt, negative="", scheduler="ddim", steps=args.steps, width=args.size,
                                height=args.size, seed=0, debug_attention=debug, device="cpu")

    variants = {"diffusers StableDiffusionPipeline": reference, "Unconfused sampler, debugger off": ours(False),
                "Unconfused sampler, debugger on": ours(True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    ref = statistics.median(times["diffusers StableDiffusionPipeline"])
    print(f"Sampling benchmark: {args.size}px, DDIM {args.steps} steps, CFG 7.5, batch 1, median of {args.rounds} "
          f"rounds (whole call / steps, so prompt encoding and VAE decode are included)")
    print("| variant | s/step | x diffusers |")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.4f} | {m / ref:.3f} |")
    if args.json:
        from _results import headline, write_json

        med = {name: statistics.median(ts) for name, ts in times.items()}
        write_json(args.json, {
            "benchmark": "sample_step",
            "settings": {"steps": args.steps, "size": args.size, "rounds": args.rounds, "scheduler": "ddim"},
            "headline": [
                headline("debugger_off", "sampling step: ours (debugger off) vs diffusers StableDiffusionPipeline",
                         med["Unconfused sampler, debugger off"], ref, "s/step",
                         med["Unconfused sampler, debugger off"] / ref, "x diffusers"),
                headline("debugger_on", "sampling step: ours (debugger on) vs diffusers StableDiffusionPipeline",
                         med["Unconfused sampler, debugger on"], ref, "s/step",
                         med["Unconfused sampler, debugger on"] / ref, "x diffusers"),
            ],
            "details": {"s_per_step": times},
        })


if __name__ == "__main__":
    main()
