"""DenseCRF quality and speed, plus SAM automatic-mode speed.

    .venv/bin/python benchmarks/crf_quality.py [--n 60] [--size 256] [--speed-repeats 3] [--no-sam] [--json PATH]

Quality: composites of real DreamBooth photos - a random blob cut from one photo pasted onto another,
so the true mask is known. The true mask is degraded the way cross-attention masks are (area-pooled
to 16x16 or 32x32 and upsampled, blurred, threshold shifted), refined by `engine.vision.crf.refine` with
CutLER's defaults, and the IoU against the truth is measured before (degraded mask > 0.5) and after.

Mask EM's CRF path: the EM refines its binary latent masks with a CRF at latent resolution, kernel
widths scaled by latent/image (`crf_at="latent"`, the default), or upsamples them and runs the CRF at
image resolution (`crf_at="image"`), or skips it (`"off"`). Measured on the same composites: the true
mask made into what the E step hands the CRF (area-pooled to the 16x16 attention grid of SD at
512 px, upsampled to the 64x64 latent, thresholded at 0.3 / 0.5 / 0.7), refined by each path with the
EM's default settings, upsampled and scored against the truth at image resolution (as the EM's IoU
per round is), with seconds per image.

Speed: CRF seconds per image at 512x512 and at 64x64 with 2-4 labels; SAM automatic mode with the
tiny random-weight test SAM, and the ViT-B image-encoder pass (the dominant cost of real SAM) with
random weights.

--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unconfused.engine.vision.regions import iou  # the pack's one IoU (tests/test_crf.py: bench.iou)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNCONFUSED_SHARED", REPO.parent / "shared"))
DREAMBOOTH = SHARED / "datasets" / "dreambooth"
DEGRADATIONS = ["lowres16", "lowres32", "lowres16+blur", "lowres32+up", "lowres32+down"]


def photos(size: int, folder: Path = DREAMBOOTH) -> list[torch.Tensor]:
    out = []
    for path in sorted(folder.glob("*/*.jpg")):
        img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
    return out


def blob(size: int, rng: np.random.Generator) -> torch.Tensor:
    """A random smooth star-convex shape covering roughly 10-35% of the image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r0 = rng.uniform(0.18, 0.32)
    ang = np.arctan2(yy - cy, xx - cx)
    r = r0 * (1 + sum(rng.uniform(-0.18, 0.18) * np.cos(k * ang + rng.uniform(0, 6.28)) for k in range(2, 5)))
    return torch.from_numpy((np.hypot(yy - cy, xx - cx) <= r).astype(np.float32))


def make_composites(n: int, size: int = 256, seed: int = 0, pool: list[torch.Tensor] | None = None):
    """[(image [S,S,3], true mask [S,S])]: a blob of one photo pasted onto another."""
    pool = pool if pool is not None else photos(size)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(pool), 2, replace=False)
        m = blob(size, rng)
        img = pool[a] * (1 - m[..., None]) + pool[b] * m[..., None]
        out.append((img, m))
    return out


def degrade(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """How attention masks go wrong: low resolution (area-pooled to 16 or 32 px, upsampled bilinearly),
    plus blur (sigma = 1/25 of the image) or a threshold shift (+-0.25, a too low / too high cut)."""
    s = mask.shape[-1]
    m = mask[None, None]
    for part in kind.split("+"):
        if part.startswith("lowres"):
            r = int(part[6:])
            m = F.interpolate(F.adaptive_avg_pool2d(m, r), size=(s, s), mode="bilinear", align_corners=False)
        elif part == "blur":
            sigma = s / 25
            k = int(sigma * 3) * 2 + 1
            x = torch.arange(k, dtype=torch.float32) - k // 2
            g = torch.exp(-x ** 2 / (2 * sigma ** 2))
            g = g / g.sum()
            m = F.conv2d(F.pad(m, (k // 2,) * 4, mode="replicate"), g.view(1, 1, 1, k))
            m = F.conv2d(m, g.view(1, 1, k, 1))
        elif part in ("up", "down"):
            m = (m + (0.25 if part == "up" else -0.25)).clamp(0, 1)
    return m[0, 0].clamp(0, 1)


def quality(n: int, size: int, seed: int = 0, settings=None) -> dict:
    from unconfused.engine.vision import crf

    rows = {k: ([], []) for k in DEGRADATIONS}
    for j, (img, m) in enumerate(make_composites(n, size, seed)):
        kind = DEGRADATIONS[j % len(DEGRADATIONS)]
        d = degrade(m, kind)
        r = crf.refine(img, d, settings)[0]
        rows[kind][0].append(iou(d, m))
        rows[kind][1].append(iou(r, m))
    before = [v for b, _ in rows.values() for v in b]
    after = [v for _, a in rows.values() for v in a]
    return {"n": len(before), "before": float(np.mean(before)), "after": float(np.mean(after)),
            "improved": float(np.mean(np.array(after) > np.array(before))),
            "by_kind": {k: (float(np.mean(b)), float(np.mean(a)), len(b)) for k, (b, a) in rows.items() if b}}


def em_crf_paths(n: int, size: int = 512, seed: int = 0, attention: int = 16) -> dict:
    """IoU and seconds per image of the mask EM's three CRF paths (see the module docstring)."""
    from unconfused.engine.vision.crf import refine, refine_latent_masks
    from unconfused.trainers.em import EMSettings

    s = EMSettings()
    lat = size // 8
    paths = {"off": [], "latent": [], "image": []}
    secs = {k: 0.0 for k in paths}
    for j, (img, m) in enumerate(make_composites(n, size, seed)):
        cut = (0.3, 0.5, 0.7)[j % 3]  # too low / even / too high threshold of the attention map
        soft = F.interpolate(F.adaptive_avg_pool2d(m[None, None], attention), size=(lat, lat), mode="bilinear",
                             align_corners=False)[0]
        binary = (soft > cut).float()  # [1, lat, lat], what binarize() gives the CRF
        for path in paths:
            t = time.perf_counter()
            if path == "off":
                out = binary
            elif path == "latent":  # trainers/em.py EMTrainer._refine, crf_at="latent"
                out = refine_latent_masks(img, binary, s.crf_settings(lat / size))
            else:  # crf_at="image"
                up = F.interpolate(binary[None], size=(size, size), mode="nearest")[0]
                fine = refine(img, up, s.crf_settings(), work_at="image", on_degenerate="keep")
                out = F.interpolate(fine[None], size=(lat, lat), mode="area")[0]
            secs[path] += time.perf_counter() - t
            full = F.interpolate(out[None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            paths[path].append(iou(full, m))
    return {p: {"iou": float(np.mean(v)), "s_per_image": secs[p] / n, "n": n} for p, v in paths.items()}


def crf_speed(size: int, labels: int, repeats: int = 3) -> float:
    from unconfused.engine.vision import crf

    img, _ = make_composites(1, size, 1, pool=photos(size)[:4])[0]
    masks = torch.stack([blob(size, np.random.default_rng(k)) for k in range(labels - 1)]) * 0.8
    crf.refine(img, masks)
    t = time.perf_counter()
    for _ in range(repeats):
        crf.refine(img, masks)
    return (time.perf_counter() - t) / repeats


def sam_speed() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from sam_helpers import TINY_SAM, tiny_sam

    from unconfused.engine.vision import sam as S

    img = photos(512)[0]
    model = S.SamModel(tiny_sam(), S.SamConfig(**TINY_SAM))
    out = {}
    for pps in (8, 16):
        t = time.perf_counter()
        regs = S.automatic_regions(model, [img], points_per_side=pps, progress=False)
        out[f"tiny automatic pps={pps}"] = (time.perf_counter() - t, len(regs))
    cfg = S.SamConfig(*S.VARIANTS["vit_b"], variant="vit_b")
    sam = S.build_sam(cfg)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        t = time.perf_counter()
        sam.image_encoder(x)
        out["vit_b image encoder (1024px, random weights)"] = (time.perf_counter() - t, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--no-sam", action="store_true")
    ap.add_argument("--speed-repeats", type=int, default=3, help="timed CRF runs per size and label count")
    ap.add_argument("--json", help="also write the headline numbers as JSON to this path")
    ap.add_argument("--em-n", type=int, default=12, help="composites for the mask EM's CRF paths (512 px)")
    ap.add_argument("--quick", action="store_true", help="fewer composites, no SAM")
    args = ap.parse_args()
    if args.quick:
        args.n, args.em_n, args.speed_repeats, args.no_sam = min(args.n, 20), min(args.em_n, 9), 1, True
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    em = em_crf_paths(args.em_n)
    print(f"Mask EM CRF paths, {args.em_n} composites at 512 px, latent 64x64, masks from a 16x16 attention grid:")
    print("| crf_at | mean IoU | s/image |\n|---|---|---|")
    for k, v in em.items():
        print(f"| {k} | {v['iou']:.3f} | {v['s_per_image']:.4f} |")
    q = quality(args.n, args.size)
    print(f"CRF quality, {q['n']} composites at {args.size}px: mean IoU {q['before']:.3f} -> {q['after']:.3f} "
          f"({q['improved']:.0%} improved)")
    print("| degradation | n | IoU before | IoU after |\n|---|---|---|---|")
    for k, (b, a, n) in q["by_kind"].items():
        print(f"| {k} | {n} | {b:.3f} | {a:.3f} |")
    print("\n| CRF size | labels (masks + background) | s/image |\n|---|---|---|")
    speed = {}
    for size in (512, 64):
        for labels in (2, 3, 4):
            speed[(size, labels)] = crf_speed(size, labels, args.speed_repeats)
            print(f"| {size}x{size} | {labels} | {speed[(size, labels)]:.4f} |")
    sam = {}
    if not args.no_sam:
        sam = sam_speed()
        print("\n| SAM | seconds | regions |\n|---|---|---|")
        for k, (t, n) in sam.items():
            print(f"| {k} | {t:.2f} | {'' if n is None else n} |")
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import headline, write_json

        heads = [headline("mean_iou", f"DenseCRF refinement: mean IoU after vs before ({q['n']} composites)",
                          q["after"], q["before"], "IoU",
                          quality=f"IoU {q['before']:.3f} -> {q['after']:.3f}, {q['improved']:.0%} improved")]
        heads += [headline(f"iou_{k}", f"DenseCRF IoU, {k} masks ({n})", a, b, "IoU",
                           quality=f"IoU {b:.3f} -> {a:.3f}") for k, (b, a, n) in q["by_kind"].items()]
        heads.append(headline("crf_512_2", "DenseCRF speed, 512x512, 2 labels", speed[(512, 2)], None, "s/image"))
        heads.append(headline("em_crf_latent_vs_image", f"Mask EM CRF at latent vs image resolution ({args.em_n} "
                              "composites, 512 px): IoU", em["latent"]["iou"], em["image"]["iou"], "IoU",
                              quality=f"off {em['off']['iou']:.3f}, latent {em['latent']['iou']:.3f} in "
                              f"{em['latent']['s_per_image']:.3f} s, image {em['image']['iou']:.3f} in "
                              f"{em['image']['s_per_image']:.3f} s"))
        write_json(args.json, {
            "benchmark": "crf_quality",
            "settings": {"n": args.n, "size": args.size, "speed_repeats": args.speed_repeats, "sam": not args.no_sam},
            "headline": heads,
            "details": {"quality": q, "em_crf_paths": em, "crf_s_per_image": {f"{s}x{s} {k} labels": v for (s, k), v in speed.items()},
                        "sam": {k: {"seconds": t, "regions": n} for k, (t, n) in sam.items()}},
        })


if __name__ == "__main__":
    main()
