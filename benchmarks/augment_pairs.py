"""Benchmark of the CLIF augmentation builder: pairs per second and peak memory at two dataset
sizes (memory must stay flat: nothing is kept per pair).

    .venv/bin/python benchmarks/augment_pairs.py [--sizes 200 2000] [--canvas 512] [--json PATH]

Each size runs in its own process (so peak RSS is that run's own). Inputs: three DreamBooth
concepts (512 px photos, centre-ellipse masks standing in for SAM), a folder bank of 100
common concepts x 2 plain-background images, R-Aug regions from a deterministic stand-in
proposer/labeller; the pair mix follows the paper's proportions (78% G-Aug, 20% R-Aug, 2% M-Aug).
--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
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
SHARED = Path(os.environ.get("UNCONFUSED_SHARED", REPO.parent / "shared"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n: int, canvas: int, work: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from unconfused.engine.data.augment.bank import bank_from_folder
    from unconfused.engine.data.augment.build import AugmentSettings, build_dataset
    from unconfused.engine import host
    from unconfused.engine.data.augment.word_lists import COMMON_CONCEPTS, label_of
    from unconfused.engine.data.concepts import Concept, make_concept_set, pil_to_tensor

    os.environ["UNCONFUSED_QUIET"] = "1"
    host.configure(output_dir=work / "output", temp_dir=work / "temp")
    rng = np.random.default_rng(0)
    bank_dir = work / "bank"
    if not bank_dir.is_dir():
        for phrase in COMMON_CONCEPTS:
            for k in range(2):
                img = Image.new("RGB", (512, 512), tuple(int(v) for v in rng.integers(200, 256, 3)))
                d = ImageDraw.Draw(img)
                d.ellipse([80 + 20 * k, 60, 430, 470], fill=tuple(int(v) for v in rng.integers(0, 150, 3)))
                d.rectangle([200, 200, 320, 300], fill=tuple(int(v) for v in rng.integers(0, 150, 3)))
                (bank_dir / label_of(phrase)).mkdir(parents=True, exist_ok=True)
                img.save(bank_dir / label_of(phrase) / f"{k}.png")
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    ellipse = (((yy - 270) / 220) ** 2 + ((xx - 256) / 170) ** 2 < 1).float()
    concepts = []
    for name, cls in [("dog2", "dog"), ("cat", "cat"), ("backpack", "backpack")]:
        photos = []
        for p in sorted((SHARED / "datasets" / "dreambooth" / name).glob("*.jpg"))[:4]:
            with Image.open(p) as im:
                photos.append(pil_to_tensor(im.convert("RGB").resize((512, 512))))
        concepts.append(Concept(f"<{name}>", cls, photos, masks=[ellipse] * len(photos)))
    cs = make_concept_set(concepts)
    words = ["head", "body", "tail", "paw", "strap", "pocket"]

    def proposer(rgb, mask):  # 3 bands x 2 columns of the cut-out
        h, w = mask.shape
        out = []
        for b in range(3):
            for c in range(2):
                m = torch.zeros_like(mask)
                m[h * b // 3:h * (b + 1) // 3, w * c // 2:w * (c + 1) // 2] = 1
                out.append(m * mask)
        return out

    def labeller(crops, vocabulary):
        return [(vocabulary[i % len(vocabulary)], 0.5 + 0.01 * i) for i in range(len(crops))]

    r = round(n * 0.2)
    per_pair = max(1, round(n * 0.02 / 3))  # 3 concepts = 3 pairs
    g = n - r - 3 * per_pair
    settings = AugmentSettings(seed=0, canvas=canvas, global_pairs=g, region_pairs=r, mix_per_pair=per_pair,
                                 vocabulary=words)
    bank = bank_from_folder(bank_dir)
    folder = work / f"ds_{n}"
    # setup (cut-outs, bank mattes, regions) is timed apart from the pairs
    t0 = time.perf_counter()
    build_dataset(cs, work / "warmup", AugmentSettings(seed=0, canvas=canvas, global_pairs=1, region_pairs=1,
                                                           mix_per_pair=0, vocabulary=words),
                    bank=bank, proposer=proposer, labeller=labeller, resume=False)
    setup_s = time.perf_counter() - t0
    rss_before = rss_mb()
    bank = bank_from_folder(bank_dir)  # mattes are cached on disk now
    t0 = time.perf_counter()
    res = build_dataset(cs, folder, settings, bank=bank, proposer=proposer, labeller=labeller, resume=False)
    secs = time.perf_counter() - t0
    total = sum(res.counts.values())
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"pairs": total, "counts": res.counts, "seconds": round(secs, 2), "pairs_per_s": round(total / secs, 2),
            "setup_s": round(setup_s, 2), "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak_mb(), 1),
            "rss_after_mb": round(rss_mb(), 1), "disk_mb": round(size / 2**20, 1), "canvas": canvas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--canvas", type=int, default=512)
    ap.add_argument("--child", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", help="also write the headline numbers as JSON to this path")
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.canvas, args.work)))
        return
    work = Path(tempfile.mkdtemp(prefix="unconfused-augment-bench-"))
    rows = []
    for n in args.sizes:
        out = run_child([sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--canvas",
                         str(args.canvas), "--work", str(work)], cwd=REPO.parent,
                        env=dict(os.environ, UNCONFUSED_QUIET="1"))
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"CPU: {os.cpu_count()} cores, torch threads default; canvas {args.canvas} px; work folder {work}")
    print("| pairs | G/R/M | seconds | pairs/s | RSS before (MB) | peak RSS (MB) | RSS after (MB) | disk (MB) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        c = r["counts"]
        print(f"| {r['pairs']} | {c.get('global', 0)}/{c.get('region', 0)}/{c.get('mix', 0)} | {r['seconds']} | "
              f"{r['pairs_per_s']} | {r['rss_before_mb']} | {r['peak_rss_mb']} | {r['rss_after_mb']} | "
              f"{r['disk_mb']} |")
    if args.json:
        lo, hi = rows[0], rows[-1]
        heads = [headline(f"pairs_per_s_{r['pairs']}", f"augment builder: {r['pairs']} pairs at {args.canvas} px",
                          r["pairs_per_s"], None, "pairs/s") for r in rows]
        if len(rows) > 1:
            heads.append(headline("peak_rss_flat", f"augment peak RSS: {hi['pairs']} vs {lo['pairs']} pairs",
                                  hi["peak_rss_mb"], lo["peak_rss_mb"], "MB", hi["peak_rss_mb"] / lo["peak_rss_mb"],
                                  "x smaller run"))
        write_json(args.json, {"benchmark": "augment_pairs", "settings": {"sizes": args.sizes, "canvas": args.canvas},
                               "headline": heads, "details": {"runs": rows, "work": str(work)}})


if __name__ == "__main__":
    main()
