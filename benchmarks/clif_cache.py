"""Benchmark of the CLIF trainer's image-feature cache: one epoch with cached CLIP features vs the
reference design (every batch's images decoded and encoded by the frozen image tower each step).

    .venv/bin/python benchmarks/clif_cache.py [--pairs 96] [--batch 16] [--epochs 1] [--size 256] [--json PATH]

Same data, batch, seed and steps in both; each mode runs in its own process, so peak RSS is its
own. The tower is an open_clip ViT-B/32 image tower (224 px, 88M parameters, random weights - speed
does not depend on the values) with a text projection fitting the demo SD text encoder; a real
SD 1.x tower (ViT-L/14, about 18x the FLOPs per image of B/32) only widens the gap. The cache
is built once (its time is reported separately: it is paid once per dataset and tower, and
reused by every later run and epoch); the table's epoch times exclude it. --json PATH also writes
the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import headline, run_child, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOWER_NAME = "unconfused-bench-vit-b-32"
TOWER_CFG = {"embed_dim": 512,
             "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_dataset(folder: Path, pairs: int, size: int) -> None:
    import torch

    from unconfused.engine.data.concepts import tensor_to_pil
    from unconfused.engine.data.augmented_dataset import DatasetWriter
    from unconfused.engine.data.synthetic import synthetic_photos

    if (folder / "manifest.json").is_file():
        return
    tokens = ["<red>", "<blue>"]
    w = DatasetWriter(folder, seed=0, settings={"bench": pairs}, concepts=[{"token": t, "class_word": "thing"}
                                                                           for t in tokens])
    for i in range(pairs):
        k = i % 2
        img = synthetic_photos(k, 1, size, seed=i)[0]
        w.add("global", i, tensor_to_pil(img), f"a photo of {tokens[k]}", [tokens[k]], {})
    w.close(True)
    del torch


def child(mode: str, work: Path, pairs: int, batch: int, epochs: int, threads: int) -> dict:
    import open_clip
    import torch
    from open_clip import factory

    from unconfused.engine import host
    from unconfused.engine.vision.clip_zero_shot import ClipScorer
    from unconfused.engine.models.demo import build_demo_model
    from unconfused.trainers.clif import ClifSettings, ClifTrainer

    os.environ["UNCONFUSED_QUIET"] = "1"
    torch.set_num_threads(threads)
    host.configure(output_dir=work / "output", temp_dir=work / "temp", models_dir=work / "models")
    factory._MODEL_CONFIGS[TOWER_NAME] = TOWER_CFG
    torch.manual_seed(0)
    tower = ClipScorer(open_clip.create_model(TOWER_NAME, pretrained=None), TOWER_NAME, name="bench-b32")
    steps = epochs * pairs // batch
    s = ClifSettings(name=f"bench-{mode}", train="tokens+lora", steps=steps, batch_size=batch, holdout=0.0,
                     warmup_steps=0, checkpoint_every=0, resume="restart", export=False, device="cpu",
                     cache_features=(mode == "cache"))
    t0 = time.perf_counter()
    trainer = ClifTrainer(build_demo_model(), work / "dataset", tower, s)
    setup = time.perf_counter() - t0
    rss_before = rss_mb()
    t1 = time.perf_counter()
    result = trainer.run()
    train_time = time.perf_counter() - t1
    return {"mode": mode, "setup_s": setup, "train_s": train_time, "epoch_s": train_time / epochs, "steps": steps,
            "final_loss": result.losses[-1], "rss_before_train_mb": rss_before, "peak_rss_mb": peak_mb(),
            "cuda_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both modes (1: a shared machine's "
                    "tiny matmuls do not wait on a busy second core)")
    ap.add_argument("--work")
    ap.add_argument("--child")
    ap.add_argument("--json", help="also write the headline numbers as JSON to this path")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.pairs, args.batch, args.epochs, args.threads)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="unconfused-clif-bench-"))
    env = dict(os.environ, UNCONFUSED_QUIET="1")
    make_dataset(work / "dataset", args.pairs, args.size)
    rows = []
    # cache build (first run, features encoded and written), then the measured runs of both modes
    for mode in ("cache", "cache", "reencode"):
        out = run_child([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--work", str(work),
                         "--pairs", str(args.pairs), "--batch", str(args.batch), "--epochs", str(args.epochs),
                         "--threads", str(args.threads)], env=env)
        rows.append(json.loads(out.strip().splitlines()[-1]))
    build, cached, reenc = rows
    print(f"CLIF epoch: {args.pairs} pairs ({args.size}px), batch {args.batch}, {cached['steps'] // args.epochs} "
          f"steps/epoch, tokens+lora, demo SD text encoder, open_clip ViT-B/32 tower (224px), CPU "
          f"({os.cpu_count()} cores, {args.threads} torch thread(s))")
    print(f"one-time cache build (encode {args.pairs} images + write): {build['setup_s']:.1f} s "
          f"(setup of a run that finds the cache: {cached['setup_s']:.1f} s)")
    print()
    print("| mode | epoch time (s) | s/step | peak RSS (MB) | RSS before training (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in (cached, reenc):
        name = "cached features" if r["mode"] == "cache" else "re-encode each step"
        print(f"| {name} | {r['epoch_s']:.2f} | {r['epoch_s'] / (r['steps'] / args.epochs):.3f} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_before_train_mb']:.0f} |")
    print(f"\nspeed-up (epoch time): {reenc['epoch_s'] / cached['epoch_s']:.1f}x; final loss cached "
          f"{cached['final_loss']:.4f}, re-encoded {reenc['final_loss']:.4f}")
    if args.json:
        write_json(args.json, {
            "benchmark": "clif_cache",
            "settings": {"pairs": args.pairs, "batch": args.batch, "epochs": args.epochs, "size": args.size,
                         "threads": args.threads},
            "headline": [
                headline("epoch", "CLIF epoch: cached image features vs re-encoding each batch", cached["epoch_s"],
                         reenc["epoch_s"], "s/epoch", reenc["epoch_s"] / cached["epoch_s"], "epoch speed-up",
                         quality=f"final loss {cached['final_loss']:.4f} vs {reenc['final_loss']:.4f}"),
                headline("peak_rss", "CLIF peak RSS: cached vs re-encoding", cached["peak_rss_mb"],
                         reenc["peak_rss_mb"], "MB", cached["peak_rss_mb"] / reenc["peak_rss_mb"], "x reference"),
                headline("cache_build", "CLIF one-time feature cache build (not in the epoch)", build["setup_s"],
                         None, "s"),
            ],
            "details": {"cache_build": build, "cached": cached, "reencode": reenc},
        })


if __name__ == "__main__":
    main()
