"""The generated reference pages match the code, and the architecture page names every module."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_node_reference_is_generated_from_the_nodes(gen):
    """docs/nodes.md is exactly what scripts/gen_docs.py makes from the nodes' declarations: every node,
    every input with its default, range and tooltip (run `python scripts/gen_docs.py nodes` after a change)."""
    from unconfused.nodes import NODE_CLASS_MAPPINGS

    page = gen.nodes_page()
    assert (REPO / "docs" / "nodes.md").read_text("utf-8") == page, "run: python scripts/gen_docs.py nodes"
    for nid, cls in NODE_CLASS_MAPPINGS.items():
        assert f"`{nid}`" in page
        for name, spec in cls.INPUT_TYPES().get("required", {}).items():
            tip = spec[1].get("tooltip") if len(spec) > 1 and isinstance(spec[1], dict) else None
            assert f"| `{name}` |" in page and (not tip or gen._cell(tip) in page), (nid, name)


def test_benchmark_page_renders_a_run_all_summary(gen, tmp_path):
    """The benchmark table comes from benchmarks/run_all.py's summary: its rows (less the column that
    compared with the old README), the run's date and machine, and the failed benchmarks."""
    summary = {"started": "2026-11-28T10:00:00+00:00", "quick": False, "wall_s": 380.0,
               "machine": {"platform": "Linux-x86_64", "cpus": 2},
               "columns": ["benchmark", "what is compared", "ours", "reference", "ratio (or quality)", "README"],
               "rows": [["lora_step", "LoRA step | same work", "471 ms", "497 ms", "0.95x", "0.95x (old)"],
                        ["crf_quality", "failed", "-", "-", "failed: boom", "-"]],
               "benchmarks": {"lora_step": {"status": "ok"}, "crf_quality": {"status": "failed"}}}
    page = gen.benchmarks_page(summary)
    assert "| benchmark | what is compared | ours | reference | ratio (or quality) |" in page
    assert "| lora_step | LoRA step \\| same work | 471 ms | 497 ms | 0.95x |" in page
    assert "0.95x (old)" not in page and "2026-11-28 10:00 UTC: 2 CPUs" in page
    assert "Failed in this run: crf_quality." in page and "--quick" not in page.split("\n\n")[-2]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**summary, "quick": True}))
    assert "`--quick` smoke run" in gen.benchmarks_page(json.loads(path.read_text()))


def test_architecture_page_names_every_module():
    """docs/architecture.md matches the code: every module of engine/ (subfolders too), trainers/, app/ and
    nodes/ has its line."""
    page = (REPO / "docs" / "architecture.md").read_text("utf-8")
    missing = [p.relative_to(REPO).as_posix() for folder in ("engine", "trainers", "app", "nodes")
               for p in sorted((REPO / folder).rglob("*.py")) if p.name != "__init__.py"
               and not re.search(rf"`{p.stem}`|`{p.relative_to(REPO / folder).with_suffix('').as_posix()}`|"
                                 rf"{p.relative_to(REPO).as_posix()}", page)]
    assert not missing, f"docs/architecture.md does not describe: {missing}"


def test_readme_links_resolve():
    """Every relative link of the front page points at a file of the repository (the Documentation list
    may name pages other branches add: those are listed in PENDING until they land)."""
    text = (REPO / "README.md").read_text("utf-8")
    links = [m for m in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in m]
    assert links
    missing = [m for m in links if not (REPO / m).exists() and m not in PENDING]
    assert not missing, missing


# docs/<topic>.md pages of the other branches of issue 15 (the lead merges them); remove once merged
PENDING = {"docs/reliability.md"}
