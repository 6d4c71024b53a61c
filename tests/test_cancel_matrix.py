"""Cancel at every stage that is not a trainer (the trainers' Cancel -> resume = uninterrupted runs
are in test_lora / test_clif / test_em / test_augment): each node, called as ComfyUI calls it, is
cancelled at its second Cancel check; it stops with Cancelled, leaves no half-written file, and
the rerun gives exactly what an uninterrupted run gives."""

from __future__ import annotations

import pytest
import torch

from sam_helpers import TINY_SAM, tiny_sam
from tiny_models import tiny_bundle
from unconfused.engine import host
from unconfused.engine.vision import sam as S
from unconfused.engine.data.concepts import Concept, ConceptSet
from unconfused.engine.errors import Cancelled
from unconfused.engine.data.synthetic import synthetic_concept


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from unconfused.engine.vision.clip_zero_shot import load_clip
    from unconfused.engine.models.demo import write_demo_clip

    images, masks = synthetic_concept(0, 2, 64)
    return {"bundle": tiny_bundle(), "sam": S.SamModel(tiny_sam(), S.SamConfig(**TINY_SAM), device="cpu"),
            "clip": load_clip(write_demo_clip(tmp_path_factory.mktemp("clip")), device="cpu"),
            "images": torch.stack(images), "masks": torch.stack(masks),
            "concept": Concept("<a>", "ball", images, masks=masks)}


def sample(p):
    from unconfused.nodes.sample import UnconfusedSample

    return UnconfusedSample().sample(model=p["bundle"], prompt="a photo of a ball", negative="", scheduler="ddim",
                                     steps=4, cfg=7.5, width=64, height=64, seed=0, batch_size=1, lora_strength=1.0,
                                     debug_attention=True)["result"][0]


def sam_automatic(p):
    from unconfused.nodes.masks import UnconfusedSAMSegment

    return UnconfusedSAMSegment().segment(sam_model=p["sam"], images=p["images"], mode="automatic", points_per_side=4,
                                          pred_iou_thresh=0.0, stability_thresh=0.0)["result"][3]


def sam_prompted(p):
    from unconfused.nodes.masks import UnconfusedSAMSegment

    return UnconfusedSAMSegment().segment(sam_model=p["sam"], images=p["images"], mode="prompted",
                                          points="0.5,0.5")["result"][0]


def concept_cutout(p):
    from unconfused.nodes.masks import UnconfusedConceptCutout

    out = UnconfusedConceptCutout().cut(concept=p["concept"], sam_model=p["sam"], clip_model=p["clip"],
                                        points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0,
                                        min_fraction=0.05)["result"][0]
    return torch.stack(out.masks)


def crf_refine(p):
    from unconfused.nodes.masks import UnconfusedCRFRefine

    return UnconfusedCRFRefine().refine(images=p["images"], mask_1=p["masks"], iterations=3)["result"][0]


def evaluate(p):
    from unconfused.nodes.evaluate import UnconfusedEvaluate

    table = UnconfusedEvaluate().evaluate(images=p["images"], prompts="a photo of <a>", concepts=ConceptSet(
        [p["concept"]]), clip_model=p["clip"], name="cancel")["result"][0]
    return table.split("\nsaved:")[0]


STAGES = [sample, sam_automatic, sam_prompted, concept_cutout, crf_refine, evaluate]


@pytest.mark.parametrize("stage", STAGES, ids=[s.__name__ for s in STAGES])
def test_cancel_mid_stage_leaves_nothing_and_the_rerun_matches(stage, parts, tmp_path, monkeypatch):
    host.configure(models_dir=tmp_path / "models", output_dir=tmp_path / "output", temp_dir=tmp_path / "temp")
    try:
        whole = stage(parts)
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        real = host.check_cancel
        calls = {"n": 0}

        def check():  # the user presses Cancel just before the second check
            calls["n"] += 1
            if calls["n"] == 2:
                host.request_cancel()
            real()

        monkeypatch.setattr(host, "check_cancel", check)
        with pytest.raises(Cancelled):
            stage(parts)
        monkeypatch.setattr(host, "check_cancel", real)
        assert calls["n"] >= 2
        assert not list(tmp_path.rglob("*.partial"))  # nothing half-written
        if stage is evaluate:  # a cancelled evaluation writes no report folder
            assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "eval" in str(p)) == \
                [p for p in before if "eval" in str(p)]
        again = stage(parts)
        if isinstance(whole, torch.Tensor):
            assert torch.equal(again, whole)
        else:
            assert again == whole
    finally:
        host.clear_cancel()
        host.reset_standalone()
