"""The toy world (engine/evaluation/toyworld.py), its trained model, its oracle (engine/evaluation/oracle.py), the training
command (trainers/toyworld.py) and the confusion benchmark's pipeline (benchmarks/toy_confusion.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from unconfused.engine.evaluation import toyworld as tw

REPO = Path(__file__).resolve().parents[1]
# what the committed oracle must reach on held-out renders (measured: see docs/toyworld.md)
ORACLE_FLOOR = {"recall": 0.95, "shape_acc": 0.9, "colour_acc": 0.95, "pattern_acc": 0.9}


def test_world_is_a_pure_function_of_seed_and_index():
    a, b = tw.scene(3, 17), tw.scene(3, 17)
    assert a.caption == b.caption and np.array_equal(a.image, b.image)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    others = [tw.scene(4, 17), tw.scene(3, 18)]
    assert all(not np.array_equal(a.image, o.image) for o in others)


def test_masks_are_exact_and_captions_name_every_object():
    held = set(tw.HELD_OUT)
    for i in range(300):
        s = tw.scene(0, i)
        assert 1 <= len(s.objects) <= 3 and s.caption.endswith(f"on {s.ground}")
        cover = np.zeros(s.image.shape[:2], int)
        for o, m in zip(s.objects, s.masks):
            assert o.concept not in held  # the personal concepts never appear in the training world
            assert o.colour in s.caption and o.shape in s.caption
            cover += m
            px = s.image[m].astype(int)
            solid = (np.array(tw.COLOURS[o.colour]) * 255).round().astype(int)
            if o.pattern == "plain":
                assert (px == solid).all()
            else:  # stripes: the solid colour and its pale version, both present
                pale = ((0.35 * np.array(tw.COLOURS[o.colour]) + 0.65) * 255).round().astype(int)
                is_solid, is_pale = (px == solid).all(1), (np.abs(px - pale) <= 1).all(1)
                assert (is_solid | is_pale).all() and is_solid.any() and is_pale.any()
        assert cover.max() == 1  # objects never overlap
        ground = (np.array(tw.GROUNDS[s.ground]) * 255).round().astype(int)
        assert (s.image[cover == 0].astype(int) == ground).all()  # outside the masks: only the ground
    assert sum("striped" in tw.scene(0, i).caption for i in range(100)) > 20


def test_personal_concept_photos_show_only_that_object():
    photos = tw.toy_concepts(n_photos=4)
    assert set(photos) == {" ".join(c) for c in tw.HELD_OUT}
    for name, scenes in photos.items():
        assert len(scenes) == 4
        for s in scenes:
            assert len(s.objects) == 1 and " ".join(s.objects[0].concept) == name and s.masks[0].sum() > 50


def test_committed_model_loads_as_sd1_through_the_pack_and_its_node(tmp_path):
    from unconfused.engine import host
    from unconfused.engine.vision.clip_image_tower import tower_from_scorer
    from unconfused.engine.models.loading import load_diffusers_folder
    from unconfused.nodes.models import UnconfusedLoadCheckpoint, checkpoint_choices

    assert tw.is_trained(), "the trained toy model is missing from engine/evaluation/toyworld_weights"
    total = sum(f.stat().st_size for f in tw.WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total < 40e6
    bundle = load_diffusers_folder(tw.MODEL_DIR)
    assert bundle.family == "sd1" and bundle.prediction_type == "epsilon"
    assert bundle.unet.config.cross_attention_dim == bundle.text_encoder.config.hidden_size
    from safetensors import safe_open

    with safe_open(str(tw.MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["world_seed"] == "0" and json.loads(meta["training_settings"])["unet_steps"] > 0
    # the node finds it as models/diffusers/<name> and loads it
    host.configure(folders={"diffusers": [tw.WEIGHTS_DIR]})
    assert "diffusers/toy-sd" in checkpoint_choices()
    node_bundle, info = UnconfusedLoadCheckpoint().load("diffusers/toy-sd", "auto", "fp32")["result"]
    assert "Stable Diffusion 1.x" in info and node_bundle.family == "sd1"
    # the open_clip file's text tower is the SD text encoder: the two text features agree
    scorer = tw.load_toy_clip()
    tower = tower_from_scorer(scorer)
    caps = ["a red ball on grass", "a big blue striped box next to a yellow ring on sand"]
    with torch.no_grad():
        hf = torch.nn.functional.normalize(node_bundle.text_encoder(node_bundle.tokenize(caps)).pooler_output
                                           @ tower.text_projection, dim=-1)
        oc = torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer(caps)).float(), dim=-1)
    assert torch.allclose(hf, oc, atol=2e-3)


def test_toy_clip_matches_pictures_to_their_captions():
    """The contrastively trained towers: each held-out scene's caption scores its own picture above
    the other scenes' pictures far more often than chance."""
    scorer = tw.load_toy_clip()
    scenes = [tw.scene(99, i) for i in range(32)]
    x = torch.stack([scorer.preprocess(torch.from_numpy(s.image).float() / 255) for s in scenes])
    with torch.no_grad():
        img = torch.nn.functional.normalize(scorer.model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer([s.caption for s in scenes]))
                                            .float(), dim=-1)
    top1 = float(((txt @ img.T).argmax(1) == torch.arange(32)).float().mean())
    assert top1 > 0.3  # chance: 1/32


def test_oracle_reads_held_out_renders():
    from unconfused.engine.evaluation import oracle as O

    oracle = O.Oracle.load()
    held = [O.oracle_scene(12345, i) for i in range(64)]  # a seed neither training nor validation used
    acc = O.score_renders(oracle, held)
    for k, floor in ORACLE_FLOOR.items():
        assert acc[k] >= floor, (k, acc)
    # and it knows what it does not see: an empty ground has no objects
    empty = torch.ones(2, 64, 64, 3) * torch.tensor(tw.GROUNDS["sand"])
    assert oracle.detect(empty) == [[], []]


def test_confusion_measures_known_answers():
    from unconfused.engine.evaluation import oracle as O

    def det(colour, shape, p=1.0):
        cp = {c: (p if c == colour else (1 - p) / 5) for c in O.COLOURS}
        sp = {s: (1.0 if s == shape else 0.0) for s in tw.SHAPES}
        return O.Detection(shape, colour, "plain", "big", (0, 0, 1, 1), (0, 0), 1, np.zeros((1, 1), bool), sp, cp,
                           {"plain": 1.0, "striped": 0.0})

    a, b = ("red", "plain", "ball"), ("blue", "plain", "ball")
    assert O.confusion_score([det("red", "ball"), det("blue", "ball")], a, b) == pytest.approx(0.0)
    assert O.confusion_score([det("red", "ball")], a, b) == pytest.approx(0.5)  # B drawn as A: half confused
    assert O.confusion_score([], a, b) == 1.0
    rep = O.pair_report([[det("red", "ball"), det("blue", "ball")], [det("red", "ball"), det("red", "ball")]], a, b)
    assert rep["both"] == 0.5 and rep["present_a"] == 1.0 and rep["present_b"] == 0.5
    assert rep["leakage"]["b"]["other"] == 0.5 and rep["leak_rate"] == 0.25


def test_training_crash_then_rerun_matches_uninterrupted(tmp_path, monkeypatch):
    """A stage of the training command, a crash in the middle, a rerun: the same weights as a run
    without the crash (batches and noise are functions of the step)."""
    from unconfused.engine.models.clip_tokenizer import clip_tokenizer
    from unconfused.trainers import toyworld as T

    s = T.ToySettings(**dict(T.QUICK, vae_steps=4, vae_batch=2, save_every=2))
    T.train(s, tmp_path / "a", tmp_path / "out_a", stages=("vae",))
    real = T.VaeStage.step

    def crash(self, step):
        if step == 3:
            raise RuntimeError("power cut")
        return real(self, step)

    monkeypatch.setattr(T.VaeStage, "step", crash)
    with pytest.raises(RuntimeError):
        T.train(s, tmp_path / "b", tmp_path / "out_b", stages=("vae",))
    assert torch.load(tmp_path / "b" / "vae.pt", weights_only=False)["step"] == 2  # the checkpoint before the crash
    monkeypatch.setattr(T.VaeStage, "step", real)
    T.train(s, tmp_path / "b", tmp_path / "out_b", stages=("vae",))
    wa = torch.load(tmp_path / "a" / "vae.pt", weights_only=False)["vae"]
    wb = torch.load(tmp_path / "b" / "vae.pt", weights_only=False)["vae"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fresh = T.VaeStage(s, tmp_path / "c", clip_tokenizer()).vae.state_dict()
    assert not all(torch.equal(wa[k], fresh[k]) for k in wa)  # it did train


def test_quick_benchmark_runs_the_pipeline_end_to_end(tmp_path):
    """One seed, a few steps: base pictures, tokens + LoRA, the oracle's measures - all numbers in range."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import toy_confusion

    res = toy_confusion.main(["--quick", "--methods", "base,baseline", "--work", str(tmp_path),
                              "--json", str(tmp_path / "r.json")])
    r = res["results"]
    assert set(r["base_confusion"]) == {"same shape", "same colour", "different"}
    for v in r["base_confusion"].values():
        assert 0 <= v["confusion_degree"] <= 1 and -1 <= v["text_cosine"] <= 1
    row = r["baseline"]
    assert 0 <= row["both"]["mean"] <= 1 and len(row["both"]["runs"]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["benchmark"] == "toy_confusion"


def test_sid_captions_keep_the_bias_object_out_and_case4_loses_the_colour(tmp_path):
    """The one effect of benchmarks/toy_confusion.py that held in every seed with a clear margin
    (docs/toyworld.md): <a-ball> photos always show a green box; with Case 1 captions the box comes
    along uninvited (seeds 0/1/2: 0.33/0.17/0.50 of the pictures), with SID's Case 3 never (0/0/0);
    describing the subject itself (Case 4) loses its colour (colour fidelity 0/0/0 vs 1/1/1).
    Seed 0 as in the benchmark, about 30 s on one free core."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import toy_confusion as T
    from unconfused.engine.evaluation.oracle import Oracle

    bundle, oracle = tw.load_toy_bundle(), Oracle.load()
    r = {case: T.measure_sid(T.train_sid_method(bundle, 0, 150, case, tmp_path), oracle, 12, 20, 4.0, 0)
         for case in ("case1", "case3", "case4")}
    assert r["case1"]["companion_leak"] >= r["case3"]["companion_leak"] + 0.15, r
    assert r["case3"]["colour_fidelity"] >= r["case4"]["colour_fidelity"] + 0.5, r


def test_the_toy_bank_is_the_same_after_an_interrupted_write(tmp_path):
    """A bank folder missing some pictures (an interrupted write) is completed to exactly the bank an
    uninterrupted write makes: each picture is a function of the seed and its place, not of what exists."""
    import hashlib

    whole, partial = tw.write_toy_bank(tmp_path / "whole"), tw.write_toy_bank(tmp_path / "partial")
    for p in sorted(partial.rglob("*.png"))[::3]:
        p.unlink()
    tw.write_toy_bank(partial)

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in folder.rglob("*.png")}

    assert digest(whole) == digest(partial) and len(digest(whole)) == 24
