"""Rerun every benchmark and print one table of their headline numbers next to the README's.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--out benchmarks/results.json]
    benchmarks/run_all [same options]

Each benchmark runs in its own subprocess, one after the other (so they do not compete for the
CPUs), with `--json PATH`: it writes its headline numbers as JSON (see benchmarks/_results.py),
which this script reads - no parsing of the human tables. A benchmark's own output is shown as it
runs; its stderr goes to a log file. A failed (or timed-out) benchmark does not stop the others:
its row says "failed" with the last line of its error, and the exit status is 1 at the end.

--quick runs every benchmark with fewer steps / repeats / pairs (a smoke check that every script
and the collection work; its numbers are not the README's). The summary (table rows, every
benchmark's JSON, wall times, status) is written atomically to --out after each benchmark.

Ratios come from interleaved timing inside one process per benchmark (machine load hits the
compared variants alike); absolute times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _results import unsteady, write_json  # noqa: E402

# name: (script, full-run args, --quick args). Defaults of each script are the README's settings, but
# lora_step runs on one torch thread, as em_step and clif_cache do by default: on a busy shared 2-CPU
# machine two threads spin-wait on a descheduled peer and skew its interleaved ratios (seen: reference
# loop 5.4 s/step vs ours 1.8 s/step at load ~5 with two threads; one thread: 0.95x / 1.32x as the README).
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "lora_step": ("lora_step.py", ["--threads", "1"], ["--steps", "2", "--threads", "1"]),
    "sample_step": ("sample_step.py", [], ["--steps", "3", "--rounds", "3", "--size", "64"]),
    "clif_cache": ("clif_cache.py", [], ["--pairs", "32", "--batch", "16"]),
    "em_step": ("em_step.py", [], ["--steps", "2", "--resolution", "128", "--first-timesteps", "20"]),
    "augment_pairs": ("augment_pairs.py", [], ["--sizes", "10", "30", "--canvas", "256"]),
    "crf_quality": ("crf_quality.py", [], ["--n", "10", "--size", "128", "--speed-repeats", "1", "--no-sam"]),
    "sid_captions": ("sid_captions.py", [], ["--latency", "0.1"]),
    "precision": ("precision.py", [], ["--quick"]),
    "toy_confusion": ("toy_confusion.py", [], ["--quick"]),
}

# What README.md quotes for each headline row (benchmark, key); a key ending in "*" matches by prefix.
README: dict[tuple[str, str], str] = {
    ("lora_step", "step_same_work"): "0.95x (612.2 vs 643.7 ms)",
    ("lora_step", "epoch_cached"): "1.32x (step 0.76x)",
    ("lora_step", "epoch_cached_tokens"): "1.12x (step 0.89x)",
    ("lora_step", "peak_memory"): "1510 vs 1484 MB",
    ("sample_step", "debugger_off"): "- (not quoted)",
    ("sample_step", "debugger_on"): "- (not quoted)",
    ("clif_cache", "epoch"): "45x (0.70 vs 31.5 s), same losses",
    ("clif_cache", "peak_rss"): "1494 vs 1548 MB",
    ("clif_cache", "cache_build"): "paid once per dataset + tower",
    ("em_step", "phase2_wall"): "1.08x (3350 vs 3112 ms)",
    ("em_step", "phase2_cpu"): "1.02x (2953 vs 2896 ms)",
    ("em_step", "phase1_wall"): "0.93x (2888 ms)",
    ("em_step", "reestimate_share"): "9.4 s, 5.3% of a round",
    ("augment_pairs", "pairs_per_s_*"): "13-39 pairs/s",
    ("augment_pairs", "peak_rss_flat"): "same peak at 200 and 2,000",
    ("crf_quality", "mean_iou"): "IoU 0.944 -> 0.971, 80% improved",
    ("crf_quality", "iou_lowres16"): "0.967 -> 0.992",
    ("crf_quality", "iou_lowres32"): "0.988 -> 0.982",
    ("crf_quality", "iou_lowres16+blur"): "0.949 -> 0.945",
    ("crf_quality", "iou_lowres32+up"): "0.912 -> 0.980",
    ("crf_quality", "iou_lowres32+down"): "0.903 -> 0.955",
    ("crf_quality", "crf_512_2"): "0.7-1.7 s",
    ("sid_captions", "validation"): "~2,400 captions/s",
    ("sid_captions", "concurrency_4"): "1.0 vs 3.0 s (3x)",
    ("sid_captions", "concurrency_8"): "0.5 vs 3.0 s (6x)",
    ("sid_captions", "request_kb"): "26 vs 81 KB",
    ("precision", "bf16_step"): "- (docs/memory.md)",
    ("precision", "memory_plan_error"): "- (docs/memory.md)",
}

COLUMNS = ["benchmark", "what is compared", "ours", "reference", "ratio (or quality)", "README"]


def readme_number(bench: str, key: str) -> str:
    if (bench, key) in README:
        return README[(bench, key)]
    for (b, k), v in README.items():
        if b == bench and k.endswith("*") and key.startswith(k[:-1]):
            return v
    return "-"


def _num(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    text = f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{text} {unit}".strip()


def _ratio(h: dict) -> str:
    parts = []
    if h.get("ratio") is not None:
        label = h.get("ratio_label") or ""
        parts.append(f"{h['ratio']:.2f}{label}" if label.startswith("x") else f"{h['ratio']:.2f}x {label}".strip())
    if h.get("spread"):  # min / median / max of the per-round ratios, flagged when wider than the claim
        lo, mid, hi = h["spread"]
        parts[-1:] = [f"{parts[-1] if parts else ''} [rounds {lo:.2f} / {mid:.2f} / {hi:.2f}]".strip()]
        if unsteady(h):
            parts.append(f"UNSTEADY: spread +-{(hi - lo) / 2:.2f} wider than the claimed margin {h['margin']:.2f}")
    if h.get("quality"):
        parts.append(h["quality"])
    return "; ".join(parts) or "-"


def rows_of(bench: str, status: dict) -> list[list[str]]:
    """Table rows of one benchmark: its headline rows, or one "failed" row."""
    if status["status"] != "ok":
        return [[bench, "failed", "-", "-", f"failed: {status['error']}", "-"]]
    return [[bench, h["what"], _num(h.get("ours"), h.get("unit", "")), _num(h.get("reference"), h.get("unit", "")),
             _ratio(h), readme_number(bench, h["key"])] for h in status["result"]["headline"]]


def table(rows: list[list[str]]) -> str:
    cell = (lambda s: str(s).replace("|", "/"))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _last_line(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # progress bars rewrite one line with \r: keep the last state of each line
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


def run_one(name: str, cmd: list[str], json_path: Path, log: Path, timeout: float) -> dict:
    """One benchmark in its own process group; its stdout is echoed, its stderr goes to `log`."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=env,
                                start_new_session=True)

        def echo():
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the benchmark and its own child processes
                rc = proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = proc.wait()
        except BaseException:  # Ctrl-C: do not leave the benchmark running
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
        reader.join(timeout=10)
    wall = time.perf_counter() - t0
    status = {"name": name, "cmd": cmd, "wall_s": round(wall, 1), "returncode": rc, "log": str(log)}
    if timed_out:
        last = _last_line(log)
        return dict(status, status="failed", error=f"timed out after {timeout:.0f} s" + (f" ({last})" if last else ""))
    if rc != 0:
        return dict(status, status="failed", error=_last_line(log) or f"exit status {rc}")
    try:
        result = json.loads(json_path.read_text())
        if not result.get("headline"):
            raise ValueError("no headline rows")
    except (OSError, ValueError) as e:
        return dict(status, status="failed", error=f"no usable --json output: {e}")
    return dict(status, status="ok", error=None, result=result)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps / repeats: a smoke check, not the numbers")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                    help=f"run only these ({', '.join(BENCHMARKS)})")
    ap.add_argument("--out", type=Path, default=HERE / "results.json", help="summary JSON (written atomically)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark before it counts as failed")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the benchmarks (default: this one)")
    args = ap.parse_args()

    names = args.only or list(BENCHMARKS)
    work = Path(tempfile.mkdtemp(prefix="unconfused-run-all-"))
    started = _dt.datetime.now(_dt.timezone.utc)
    summary = {"started": started.isoformat(timespec="seconds"), "quick": args.quick, "python": args.python,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_average_at_start": list(os.getloadavg())},
               "logs": str(work), "benchmarks": {}, "rows": [], "columns": COLUMNS}
    statuses: dict[str, dict] = {}
    for i, name in enumerate(names, 1):
        script, full, quick = BENCHMARKS[name]
        json_path = work / f"{name}.json"
        cmd = [args.python, str(HERE / script), *(quick if args.quick else full), "--json", str(json_path)]
        print(f"\n=== [{i}/{len(names)}] {name}: {' '.join(cmd[1:])}", flush=True)
        st = run_one(name, cmd, json_path, work / f"{name}.stderr.log", args.timeout)
        statuses[name] = st
        print(f"=== {name}: {st['status']} in {st['wall_s']:.1f} s"
              + (f" - {st['error']} (log: {st['log']})" if st["status"] != "ok" else ""), flush=True)
        summary["benchmarks"][name] = st
        summary["rows"] = [r for n in statuses for r in rows_of(n, statuses[n])]
        summary["wall_s"] = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1)
        write_json(args.out, summary)

    failed = [n for n, st in statuses.items() if st["status"] != "ok"]
    print(f"\n## Benchmarks{' (--quick: smoke check, not comparable to the README)' if args.quick else ''}, "
          f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs\n")
    print(table(summary["rows"]))
    print("\n| benchmark | status | wall s |\n|---|---|---|")
    for n, st in statuses.items():
        print(f"| {n} | {st['status']} | {st['wall_s']:.1f} |")
    print(f"| total | {len(names) - len(failed)}/{len(names)} ok | {summary['wall_s']:.1f} |")
    shaky = [f"{n}:{h['key']}" for n, st in statuses.items() if st["status"] == "ok"
             for h in st["result"]["headline"] if unsteady(h)]
    summary["unsteady"] = shaky
    write_json(args.out, summary)
    if shaky:
        print(f"\nUNSTEADY rows (their rounds disagree more than the ratio claims; rerun on a quieter machine or "
              f"with more --rounds): {', '.join(shaky)}")
    print(f"\nsummary: {args.out}; benchmark logs: {work}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
