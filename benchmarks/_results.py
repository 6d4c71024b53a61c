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
             quality: str | None = None) -> dict:
    f = (lambda v: None if v is None else float(v))
    return {"key": key, "what": what, "ours": f(ours), "reference": f(reference), "unit": unit, "ratio": f(ratio),
            "ratio_label": ratio_label, "quality": quality}


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
