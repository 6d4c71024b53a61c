"""Fixtures shared by the whole suite. Small random-weight models live in tests/tiny_models.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UNCONFUSED_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DREAMBOOTH = REPO / "tests" / "data" / "dreambooth"


@pytest.fixture(scope="session")
def dreambooth_dir() -> Path:
    """Real photos inside the repository (tests/data/dreambooth: three DreamBooth subjects at 256 px, their
    licence file beside them), so a fresh clone runs the whole suite with nothing beside it."""
    assert DREAMBOOTH.is_dir(), f"the test photos are missing: {DREAMBOOTH}"
    return DREAMBOOTH


@pytest.fixture(autouse=True)
def _standalone_host(tmp_path):
    """Every test starts with a clean host adapter whose folders live in its tmp dir."""
    from unconfused.engine import host

    host.reset_standalone()
    host.configure(models_dir=tmp_path / "models", output_dir=tmp_path / "output", temp_dir=tmp_path / "temp")
    (tmp_path / "temp").mkdir()
    yield
    host.reset_standalone()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (.ci/run sets UNCONFUSED_REQUIRE_ALL=1) a test may not skip itself: a missing
    ComfyUI, browser or frontend package is an install step that failed, not a reason to skip
    what an issue asked to prove."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("UNCONFUSED_REQUIRE_ALL") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, which must run it: {reason}"


# Slow groups a contributor can leave out: `pytest -m "not comfyui and not browser and not fullsize"` is
# the fast part; CI (.ci/run) runs everything. By file, or file::test where one test of a file is slow.
MARKERS = {
    "comfyui": ("starts the real ComfyUI (a server, or stock ComfyUI code in a subprocess)",
                {"test_augment_comfy.py", "test_browser.py", "test_clif_comfy.py", "test_comfyui.py",
                 "test_em_comfy.py", "test_flagship.py", "test_loader_parity.py", "test_sid_comfy.py",
                 "test_stock_parity.py", "test_sam.py::test_example_workflow_runs_in_real_comfyui",
                 "test_clif.py::test_exports_give_our_conditioning_in_stock_comfyui"}),
    "browser": ("drives the ComfyUI frontends in a headless browser (playwright)", {"test_browser.py"}),
    "fullsize": ("builds the full-size SD 1.5 / 2.1 architectures (random weights)",
                 {"test_loader_parity.py", "test_stock_parity.py",
                  "test_comfyui.py::test_stock_nodes_generate_with_the_exported_files",
                  "test_clif.py::test_exports_give_our_conditioning_in_stock_comfyui"}),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "hardening: a case of the hardening matrix (tests/hardening_matrix.py)")
    for name, (what, _) in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(config, items):
    from hardening_matrix import entries

    listed = entries()
    for item in items:
        file = Path(str(item.fspath)).name
        key = f"{file}::{item.originalname}"
        if key in listed:
            item.add_marker(pytest.mark.hardening)
        for name, (_, where) in MARKERS.items():
            if file in where or key in where:
                item.add_marker(getattr(pytest.mark, name))
