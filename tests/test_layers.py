"""The layers hold: nodes/ and app/ -> trainers/ -> engine/, and only engine/host.py reaches ComfyUI.

Scans the source (ast for imports, text for ComfyUI names), and imports the engine in a fresh
interpreter to see that no node module comes along."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = {"tests", ".venv", ".git", "node_modules", "__pycache__", "build", "dist", ".cache"}  # not the pack's code


def sources(*folders: str) -> list[Path]:
    roots = [REPO / f for f in folders] if folders else [REPO]
    out = []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            if not SKIP & set(p.relative_to(REPO).parts):
                out.append(p)
    return out


def imported_modules(path: Path, text: str | None = None) -> list[str]:
    """Absolute names of what `path` imports (relative imports resolved against its package)."""
    package = ["unconfused", *path.relative_to(REPO).parts[:-1]]
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8") if text is None else text)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # `from .. import nodes` names a module too
    return out


def test_importing_the_engine_imports_no_node_module():
    code = ("import sys, unconfused.engine.models.loading; "
            "bad = [m for m in sys.modules if m.startswith('unconfused.nodes')]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this run's `unconfused`
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_engine_and_trainers_import_neither_nodes_nor_app():
    above = ("unconfused.nodes", "unconfused.app")
    offenders = [f"{p.relative_to(REPO)}: {m}" for p in sources("engine", "trainers")
                 for m in imported_modules(p) if m in above or m.startswith(tuple(a + "." for a in above))]
    assert not offenders, "engine/ and trainers/ must not import nodes/ or app/:\n" + "\n".join(offenders)


def test_the_engine_imports_nothing_above_it():
    above = ("unconfused.nodes", "unconfused.app", "unconfused.trainers")
    offenders = [f"{p.relative_to(REPO)}: {m}" for p in sources("engine")
                 for m in imported_modules(p) if m in above or m.startswith(tuple(a + "." for a in above))]
    assert not offenders, "engine/ must not import nodes/, app/ or trainers/:\n" + "\n".join(offenders)


def test_the_import_scan_sees_relative_and_late_imports():
    """The scan is not blind: the late import flow.py had before the stages moved, and `from .. import`."""
    flow = REPO / "app" / "flow.py"
    assert imported_modules(flow, "def f():\n    from ..nodes.augment import region_tools\n") == [
        "unconfused.nodes.augment", "unconfused.nodes.augment.region_tools"]
    assert "unconfused.nodes" in imported_modules(flow, "from .. import nodes\n")
    assert imported_modules(REPO / "engine" / "x.py", "from .host import device\n")[0] == "unconfused.engine.host"


COMFY = re.compile(r"\bfolder_paths\b|\bcomfy\.")


def test_only_host_mentions_comfyui():
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in sources()
                 if p.relative_to(REPO).as_posix() != "engine/host.py"
                 for i, line in enumerate(p.read_text("utf-8").splitlines(), 1) if COMFY.search(line)]
    assert not offenders, "only engine/host.py may mention folder_paths / comfy.:\n" + "\n".join(offenders)
