"""Sampler speed: seconds per sampling step of Unconfused's sampler (debugger off and on) vs
diffusers' StableDiffusionPipeline called directly, same model, prompt, scheduler, size.
Every variant is warmed up, torch's threads are fixed (--threads), and the rounds run the variants
interleaved in a rotating order so machine load hits them alike. Prints a table with the min /
median / max of the per-round ratios beside each ratio.

    .venv/bin/python benchmarks/sample_step.py [--steps 20] [--size 128] [--rounds 7] [--threads 1] [--json PATH]

--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

os.environ.setdefault("UNCONFUSED_QUIET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step import bundle  # noqa: E402  (SD 1.5 proportions at quarter width)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every variant (default 1)")
    p.add_argument("--json", help="also write the headline numbers as JSON to this path")
    args = p.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from unconfused.engine import host
    from unconfused.engine.models import sampling as S
    from unconfused.engine.models.concept_tokens import add_concept_tokens

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
    from _results import fix_threads, interleaved, ratio_spread

    threads = fix_threads(args.threads)
    times = interleaved(variants, args.rounds, per=args.steps)
    ref_name = "diffusers StableDiffusionPipeline"
    ref = statistics.median(times[ref_name])
    print(f"Sampling benchmark: {args.size}px, DDIM {args.steps} steps, CFG 7.5, batch 1, {threads} thread(s), "
          f"median of {args.rounds} interleaved rounds after a warm-up (whole call / steps, so prompt encoding and "
          "VAE decode are included)")
    print("| variant | s/step (min / median / max) | x diffusers, median (min .. max of rounds) |")
    print("|---|---|---|")
    for name, ts in times.items():
        lo, mid, hi = ratio_spread(ts, times[ref_name])
        print(f"| {name} | {min(ts):.4f} / {statistics.median(ts):.4f} / {max(ts):.4f} | "
              f"{statistics.median(ts) / ref:.3f} ({lo:.2f} .. {hi:.2f}) |")
    if args.json:
        from _results import headline, write_json

        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows = []
        for key, name in (("debugger_off", "Unconfused sampler, debugger off"),
                          ("debugger_on", "Unconfused sampler, debugger on")):
            rows.append(headline(key, f"sampling step: ours ({name.split(', ')[1]}) vs diffusers StableDiffusionPipeline",
                                 med[name], ref, "s/step", med[name] / ref, "x diffusers",
                                 spread=ratio_spread(times[name], times[ref_name])))
        write_json(args.json, {
            "benchmark": "sample_step",
            "settings": {"steps": args.steps, "size": args.size, "rounds": args.rounds, "scheduler": "ddim",
                         "threads": threads},
            "headline": rows,
            "details": {"s_per_step": times},
        })


if __name__ == "__main__":
    main()
