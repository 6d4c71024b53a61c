"""Mixed precision on the CPU and the GPU memory plan's accuracy.

1. A LoRA trainer step (the real `LoraTrainer`, tokens + UNet LoRA, cached latents) with the
   frozen weights in bf16 under autocast against the same step in fp32, on SD 1.5's UNet / VAE /
   text encoder at a quarter of their width (benchmarks/lora_step.py's model). Steps of the two
   run interleaved in one process, so machine load hits both alike: the ratio is the result.
2. The memory plan (trainers/memory_plan.py: one step under fake tensors) against the real peak of
   the same step on the CPU (torch.profiler's allocator timeline plus the tensors alive before),
   for several resolutions / batches / gradient checkpointing on the demo model: the error.

    .venv/bin/python benchmarks/precision.py [--steps 6] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import headline, write_json  # noqa: E402

CONFIGS = [(64, 1, False), (128, 2, False), (128, 2, True), (128, 4, False)]  # resolution, batch, checkpointing


def step_ratio(steps: int, resolution: int) -> dict:
    from lora_step import bundle, photos

    from unconfused.trainers.lora import LoraSettings, LoraTrainer

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            s = LoraSettings(resolution=resolution, precision=precision, device="cpu", steps=steps + 1, seed=0)
            trainers[precision] = LoraTrainer(bundle(), photos(), s, run_root=Path(tmp) / precision)
        times = {p: [] for p in trainers}
        losses = {p: [] for p in trainers}
        for p, tr in trainers.items():  # warm-up (first-call allocations, optimizer state)
            tr.step(0)
        for i in range(1, steps + 1):
            for p, tr in trainers.items():
                t0 = time.perf_counter()
                losses[p].append(tr.step(i))
                times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(t) for p, t in times.items()}
    return {"median_s": med, "ratio": med["bf16"] / med["fp32"], "losses": losses, "times": times}


def memory_error(configs) -> list[dict]:
    from unconfused.trainers import memory_plan as MP
    from unconfused.engine.models.demo import build_demo_model
    from unconfused.trainers.lora import LoraSettings, LoraTrainer

    rows = []
    for res, batch, ckpt in configs:
        s = LoraSettings(resolution=res, batch_size=batch, gradient_checkpointing=ckpt, precision="fp32", device="cpu")
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            tr = LoraTrainer(build_demo_model(), MP._synthetic_concepts(res), s, run_root=tmp)
            tr.step(1)
            measured, during = MP.measure_cpu(tr, 2)
            del tr
        t0 = time.perf_counter()
        est = MP.estimate("lora", "demo", s)
        rows.append({"resolution": res, "batch": batch, "checkpointing": ckpt, "measured": measured,
                     "step_part": during, "estimate": est.peak, "error": est.peak / measured - 1,
                     "step_part_error": (est.peak - (measured - during)) / during - 1,
                     "estimate_s": time.perf_counter() - t0})
    return rows


def memory_table() -> str:
    """docs/memory.md's table: full-size SD 1.5 at 512 and SD 2.1 at 768, each trainer, the GPU
    memory it needs and what to set for each GPU size (several fake steps per row: minutes)."""
    from unconfused.trainers import memory_plan as MP
    from unconfused.trainers.clif import ClifSettings
    from unconfused.trainers.em import EMSettings
    from unconfused.trainers.lora import LoraSettings

    rows = []
    for family, res in (("sd1", 512), ("sd2", 768)):
        rows += [(family, "LoRA + tokens, batch 1", "lora", LoraSettings(resolution=res)),
                 (family, "LoRA + tokens, batch 4", "lora", LoraSettings(resolution=res, batch_size=4)),
                 (family, "LoRA + tokens, batch 1, fp32", "lora", LoraSettings(resolution=res, precision="fp32")),
                 (family, "LoRA + tokens + text-encoder LoRA, batch 8, latents not cached", "lora",
                  LoraSettings(resolution=res, batch_size=8, text_encoder_lora=True, cache_latents=False)),
                 (family, "mask EM, batch 1", "em", EMSettings(resolution=res)),
                 (family, "CLIF tokens, batch 32", "clif", ClifSettings(train="tokens")),
                 (family, "CLIF tokens+lora, batch 32", "clif", ClifSettings(train="tokens+lora")),
                 (family, "CLIF tokens+full, batch 32", "clif", ClifSettings(train="tokens+full")),
                 (family, "CLIF tokens+full, batch 128, features not cached", "clif",
                  ClifSettings(train="tokens+full", batch_size=128, cache_features=False))]
    out = ["| model | run (defaults otherwise) | needs | " + " | ".join(f"{g} GB" for g in MP.GPU_SIZES) + " |",
           "|---|---|---|" + "---|" * len(MP.GPU_SIZES)]
    for family, label, trainer, s in rows:
        a = MP.advise(trainer, family, s)
        cells = []
        for g in MP.GPU_SIZES:
            got = a.fits[g]
            cells.append("no" if got is None else "as is" if not got[0] else
                         "; ".join(n.split(" (")[0] for n in got[0]) + f" ({got[1].gb():.1f})")
        name = {"sd1": "SD 1.5, 512", "sd2": "SD 2.1, 768"}[family]
        out.append(f"| {name} | {label} | {a.plan.gb():.1f} GB | " + " | ".join(cells) + " |")
        print(out[-1], flush=True)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 steps, 2 memory configurations")
    ap.add_argument("--json")
    ap.add_argument("--table", action="store_true", help="only print docs/memory.md's table (full-size models)")
    args = ap.parse_args()
    if args.table:
        print(memory_table())
        return
    torch.set_num_threads(args.threads)
    steps = 2 if args.quick else args.steps
    r = step_ratio(steps, args.resolution)
    mem = memory_error(CONFIGS[:2] if args.quick else CONFIGS)
    print(f"LoRA trainer step on the CPU, quarter-width SD 1.5, {args.resolution}px, median of {steps} interleaved "
          f"steps, {args.threads} thread(s)")
    print("| precision | s/step | x fp32 |")
    print("|---|---|---|")
    for p, m in r["median_s"].items():
        print(f"| {p} | {m:.3f} | {m / r['median_s']['fp32']:.2f} |")
    print("\nMemory plan (fake tensors) vs the real CPU peak of the same step, demo model, fp32")
    print("| resolution | batch | checkpointing | measured MB | estimate MB | error | step part error |")
    print("|---|---|---|---|---|---|---|")
    for row in mem:
        print(f"| {row['resolution']} | {row['batch']} | {row['checkpointing']} | {row['measured'] / 2**20:.1f} | "
              f"{row['estimate'] / 2**20:.1f} | {row['error']:+.1%} | {row['step_part_error']:+.1%} |")
    worst = max(mem, key=lambda row: abs(row["error"]))
    worst_step = max(mem, key=lambda row: abs(row["step_part_error"]))
    write_json(args.json, {
        "benchmark": "precision",
        "settings": {"steps": steps, "resolution": args.resolution, "threads": args.threads, "quick": args.quick},
        "headline": [
            headline("bf16_step", "LoRA step on the CPU: bf16 autocast vs fp32", r["median_s"]["bf16"],
                     r["median_s"]["fp32"], "s/step", r["ratio"], "x fp32"),
            headline("memory_plan_error", "memory plan vs measured CPU peak (worst of the configurations)",
                     worst["estimate"] / 2**20, worst["measured"] / 2**20, "MB", 1 + worst["error"], "x measured",
                     quality=f"total {min(m['error'] for m in mem):+.1%}..{max(m['error'] for m in mem):+.1%}, "
                             f"step part up to {worst_step['step_part_error']:+.1%}"),
        ],
        "details": {"step": r, "memory": mem},
    })


if __name__ == "__main__":
    main()
