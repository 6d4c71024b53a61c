"""Machine-readable headline numbers of a benchmark (its `--json PATH` option), read by run_all.py.

Each benchmark writes one JSON object:

    {"benchmark": "lora_step", "settings": {...}, "details": {...},
     "headline": [{"key": ..., "what": ..., "ours": float|None, "reference": float|None, "unit": str,
                   "ratio": float|None, "ratio_label": str, "quality": str|None}, ...]}

`ratio` is what the README quotes for that row (e.g. ours / reference step time, or reference / ours
epoch time as a speed-up - `ratio_label` says which); `quality` is a free-form result for rows that
are not a ratio (e.g. "IoU 0.944 -> 0.971").
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def headline(key: str, what: str, ours=None, reference=None, unit: str = "", ratio=None, ratio_label: str = "",
             quality: str | None = None, spread: list[float] | None = None, margin: float | None = None) -> dict:
    """One row. `spread`: [min, median, max] of the per-round ratios (interleaved rounds); `margin`:
    how far from 1.0 the row claims the ratio is (default |ratio - 1|, at least SAME) - run_all flags
    a row whose spread is wider than that."""
    f = (lambda v: None if v is None else float(v))
    row = {"key": key, "what": what, "ours": f(ours), "reference": f(reference), "unit": unit, "ratio": f(ratio),
           "ratio_label": ratio_label, "quality": quality}
    if spread is not None:
        row["spread"] = [float(x) for x in spread]
        claimed = float(ratio) if ratio is not None else float(spread[1])
        row["margin"] = float(margin) if margin is not None else max(abs(claimed - 1.0), SAME)
    return row


SAME = 0.05  # a ratio within 5% of 1.0 claims "the same speed": its rounds may spread that much


def unsteady(row: dict) -> bool:
    """A ratio whose rounds disagree more than the claim: half the min-max width of the per-round
    ratios is wider than the claimed margin (e.g. 0.45x..2.26x around a claimed 1.00x +- 0.05)."""
    spread, margin = row.get("spread"), row.get("margin")
    if not spread or margin is None:
        return False
    return (spread[2] - spread[0]) / 2 > max(margin, 1e-9)


def fix_threads(n: int) -> int:
    """Pin torch's threads for a benchmark: one fixed count for every variant and round (a shared
    machine's load otherwise changes what 'default threads' means between rounds)."""
    import torch

    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def interleaved(variants: dict, rounds: int, *, warmup: int = 1, per: float = 1.0) -> dict[str, list[float]]:
    """Seconds per call (divided by `per`) of every variant: each is warmed up first, then the
    rounds run them interleaved in a rotating order, so load and caches hit all alike."""
    import time

    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - t0) / per)
    return times


def ratio_spread(ours: list[float], reference: list[float]) -> list[float]:
    """[min, median, max] of the per-round ratios ours/reference."""
    import statistics

    r = [a / b for a, b in zip(ours, reference)]
    return [min(r), statistics.median(r), max(r)]


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    """Write `data` to `path` atomically (temp file in the same folder + os.replace); no-op without a path."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run_child(cmd: list[str], **kw) -> str:
    """subprocess.run(cmd, capture_output=True, text=True) -> its stdout; when it fails, its stderr goes to
    ours and the error names the child's last stderr line (not only "returned non-zero exit status")."""
    import subprocess
    import sys

    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        raise SystemExit(f"child {' '.join(map(str, cmd[1:4]))} ... failed (exit {out.returncode}): "
                         f"{lines[-1] if lines else 'no error output'}")
    return out.stdout
