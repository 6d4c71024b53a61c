"""Benchmark of the SID caption checker and the captioner's plumbing (no real VLM is available offline here):

- checker quality on tests/data/sid_captions.tsv (several hundred captions written from the paper's
  Case 1-4 definitions): precision and recall of "not a SID caption as written" (Case 1, 2 and 4
  caught, Case 3 passed), and the share of exact verdicts per form;
- validation/repair throughput on the 43-caption table of tests/test_sid.py;
- the OpenAI-compatible backend against a loopback chat-completions server that answers after a
  fixed latency (standing in for a hosted model): wall time for the DreamBooth dog2 photos at
  concurrency 1 / 4 / 8, and the request size per photo at two `max_image_side` values.

    .venv/bin/python benchmarks/sid_captions.py [--latency 0.5] [--json PATH]

--json PATH also writes the headline numbers (read by benchmarks/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNCONFUSED_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--json", help="also write the headline numbers as JSON to this path")
    ap.add_argument("--quick", action="store_true", help="only the checker's quality (no server)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "data"))
    from sid_make_captions import load_table, score

    q = score(load_table())
    print(f"SID checker on {q['n']} captions (Case 1-4): precision {q['precision']:.3f}, recall {q['recall']:.3f}, "
          f"Case 3 passed {q['specificity']:.3f}, exact verdict {q['exact']:.3f}")
    print("| case / form | exact verdicts |\n|---|---|")
    for form, (ok, n) in sorted(q["forms"].items()):
        print(f"| {form} | {ok}/{n} |")
    for r, c in q["misses"]:
        print(f"miss: case {r['case']} {r['form']}: expected {r['expected']}, got {c.status}: {r['caption']}")
    quality = {k: round(q[k], 4) for k in ("n", "precision", "recall", "specificity", "exact")}
    if args.quick and not args.json:
        return
    from test_sid import TABLE
    from vlm_helpers import GOOD, FakeServer

    from unconfused.engine.captions import sid, vlm

    rows = [(who, text) for who, text, *_ in TABLE] * 50
    t = time.perf_counter()
    for (tok, cls), text in rows:
        sid.check_caption(text, tok, cls, mode="style" if cls == "art" else "subject")
    dt = time.perf_counter() - t
    out = {"validation_captions_per_s": round(len(rows) / dt), "checker": quality}

    photos = sorted((SHARED / "datasets" / "dreambooth" / "dog2").glob("*.jp*g"))
    images = [Image.open(p).convert("RGB") for p in photos]
    server = FakeServer()
    server.default = ("sleep", args.latency, GOOD)
    instruction = sid.build_instruction("<sks>", "dog")
    try:
        for side in (1024, 256):
            b = vlm.OpenAIBackend(server.url, "m", "", max_image_side=side)
            out[f"request_kb_at_{side}px"] = round(sum(len(json.dumps(b.request_body(im, instruction)))
                                                       for im in images) / len(images) / 1024, 1)
        for conc in (1, 4, 8):
            b = vlm.OpenAIBackend(server.url, "m", "", concurrency=conc, max_image_side=512)
            t = time.perf_counter()
            caps = b.caption(images, [instruction] * len(images))
            assert caps == [GOOD] * len(images)
            out[f"{len(images)}_photos_latency_{args.latency}s_concurrency_{conc}_s"] = round(
                time.perf_counter() - t, 2)
    finally:
        server.close()
    print(json.dumps(out, indent=1))
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import headline, write_json

        n = len(images)
        wall = {c: out[f"{n}_photos_latency_{args.latency}s_concurrency_{c}_s"] for c in (1, 4, 8)}
        write_json(args.json, {
            "benchmark": "sid_captions",
            "settings": {"latency_s": args.latency, "photos": n},
            "headline": [
                headline("precision", f"SID checker precision ({q['n']} Case 1-4 captions)", q["precision"], None, ""),
                headline("recall", f"SID checker recall ({q['n']} Case 1-4 captions)", q["recall"], None, ""),
                headline("validation", "SID caption validation/repair", out["validation_captions_per_s"], None,
                         "captions/s"),
                headline("concurrency_4", f"SID backend, {n} photos, {args.latency} s server: concurrency 4 vs 1",
                         wall[4], wall[1], "s", wall[1] / wall[4] if wall[4] else None, "x faster"),
                headline("concurrency_8", f"SID backend, {n} photos, {args.latency} s server: concurrency 8 vs 1",
                         wall[8], wall[1], "s", wall[1] / wall[8] if wall[8] else None, "x faster"),
                headline("request_kb", "SID request size per photo: max_image_side 256 vs full (512 px photo)",
                         out["request_kb_at_256px"], out["request_kb_at_1024px"], "KB",
                         out["request_kb_at_256px"] / out["request_kb_at_1024px"], "x full"),
            ],
            "details": out,
        })


if __name__ == "__main__":
    main()
