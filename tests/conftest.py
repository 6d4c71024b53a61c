"""Fixtures shared by the whole suite. Small random-weight models live in tests/tiny_models.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UNCONFUSED_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNCONFUSED_SHARED", REPO.parent / "shared"))
DREAMBOOTH = SHARED / "datasets" / "dreambooth"


@pytest.fixture(scope="session")
def dreambooth_dir() -> Path:
    """Real photos (../shared/datasets/dreambooth). CI clones the repo with shared/ beside it."""
    assert DREAMBOOTH.is_dir(), f"the shared photos are missing: {DREAMBOOTH}"
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


def pytest_configure(config):
    config.addinivalue_line("markers", "hardening: a case of the hardening matrix (tests/hardening_matrix.py)")


def pytest_collection_modifyitems(config, items):
    from hardening_matrix import entries

    listed = entries()
    for item in items:
        key = f"{Path(str(item.fspath)).name}::{item.originalname}"
        if key in listed:
            item.add_marker(pytest.mark.hardening)
