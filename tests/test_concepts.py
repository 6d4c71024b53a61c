"""Concepts as data: validation messages, the concept nodes, and the on-disk round trip."""

import json

import pytest
import torch

from unconfused.engine.data import concepts as C
from unconfused.engine.errors import UnconfusedError
from unconfused.nodes.concepts import (UnconfusedConcept, UnconfusedConceptFromFolder, UnconfusedConceptSet,
                                       UnconfusedLoadConceptSet, UnconfusedSaveConceptSet)


def photos(dreambooth_dir, subject, n=2):
    imgs = [C.pil_to_tensor(__import__("PIL.Image").Image.open(p)) for p in sorted((dreambooth_dir / subject).glob("*.jpg"))[:n]]
    return imgs


def batch(imgs, size=64):
    return C.to_batch(imgs, (size, size))


def test_concept_node_builds_concept_with_preview(dreambooth_dir, tmp_path):
    imgs = batch(photos(dreambooth_dir, "dog2"))
    masks = torch.zeros(2, 64, 64)
    masks[:, 16:48, 16:48] = 1
    out = UnconfusedConcept().make("<my-dog>", "dog", imgs, masks, "a photo of <my-dog> dog\non grass")
    (concept,) = out["result"]
    assert concept.token == "<my-dog>" and concept.class_word == "dog"
    assert len(concept.images) == 2 and concept.images[0].shape == (64, 64, 3)
    assert torch.equal(concept.masks[1], masks[1])
    assert concept.captions == ["a photo of <my-dog> dog", "on grass"]
    (preview,) = out["ui"]["images"]
    assert (tmp_path / "temp" / preview["filename"]).is_file() and preview["type"] == "temp"


@pytest.mark.parametrize("kwargs,input_name,needle", [
    (dict(token="dog"), "token", "already a word"),
    (dict(token="my dog"), "token", "spaces"),
    (dict(token="  "), "token", "empty"),
    (dict(class_word=""), "class_word", "class word is empty"),
    (dict(images=torch.zeros(0, 64, 64, 3)), "images", "empty"),
    (dict(masks=torch.ones(3, 64, 64)), "masks", "3 masks for 2 images"),
    (dict(masks=torch.ones(2, 32, 64)), "masks", "must have their image's size"),
    (dict(captions="only one line"), "captions", "1 caption lines for 2 images"),
])
def test_concept_node_rejects_bad_input(kwargs, input_name, needle):
    args = dict(token="<alice>", class_word="woman", images=torch.rand(2, 64, 64, 3), masks=None, captions="")
    args.update(kwargs)
    with pytest.raises(UnconfusedError) as e:
        UnconfusedConcept().make(**args)
    assert f"[UnconfusedConcept] input '{input_name}'" in str(e.value)
    assert needle in str(e.value)


def test_grayscale_and_rgba_batches_become_rgb():
    gray = C.image_batch_to_list(torch.rand(1, 8, 8, 1))
    rgba = C.image_batch_to_list(torch.rand(1, 8, 8, 4))
    assert gray[0].shape == (8, 8, 3) and torch.equal(gray[0][..., 0], gray[0][..., 2])
    assert rgba[0].shape == (8, 8, 3)


def test_concept_set_rejects_duplicates():
    a = C.make_concept("<a>", "dog", torch.rand(1, 8, 8, 3))
    a2 = C.make_concept("<a>", "cat", torch.rand(1, 8, 8, 3))
    with pytest.raises(UnconfusedError) as e:
        UnconfusedConceptSet().gather(concept_1=a, concept_2=a2)
    assert "concept_1 and concept_2" in str(e.value) and "input 'concept_2'" in str(e.value)
    a = C.make_concept("<zqx>", "dog", torch.rand(1, 8, 8, 3))
    b = C.make_concept("zqx>", "dog", torch.rand(1, 8, 8, 3))  # same file name as <zqx>
    with pytest.raises(UnconfusedError, match="same file name"):
        UnconfusedConceptSet().gather(concept_1=a, concept_3=b)
    with pytest.raises(UnconfusedError, match=r"input .concept_2.: expected a concept"):
        UnconfusedConceptSet().gather(concept_1=a, concept_2="oops")


def test_concept_set_round_trip_through_nodes(dreambooth_dir, tmp_path):
    dog = C.Concept("<my-dog>", "dog", photos(dreambooth_dir, "dog2"), captions=["a", "b"])
    cat = C.Concept("<my-cat>", "cat", photos(dreambooth_dir, "cat", 3),
                    masks=[torch.rand(*img.shape[:2]).round() for img in photos(dreambooth_dir, "cat", 3)])
    (cs,) = UnconfusedConceptSet().gather(concept_1=dog, concept_2=cat)["result"]
    folder = UnconfusedSaveConceptSet().save(cs, "pets")["result"][0]
    assert folder == str(tmp_path / "output" / "unconfused" / "concept_sets" / "pets")
    meta = json.loads((tmp_path / "output/unconfused/concept_sets/pets/concept_set.json").read_text())
    assert [c["token"] for c in meta["concepts"]] == ["<my-dog>", "<my-cat>"]
    assert (tmp_path / "output/unconfused/concept_sets/pets/my-dog/000.txt").read_text().strip() == "a"
    (back,) = UnconfusedLoadConceptSet().load("pets")["result"]
    assert back.tokens == cs.tokens
    for orig, new in zip(cs.concepts, back.concepts):
        assert orig.class_word == new.class_word and orig.captions == new.captions
        for a, b in zip(orig.images, new.images):
            assert a.shape == b.shape and (a - b).abs().max() <= 1 / 255 + 1e-6
    for a, b in zip(cat.masks, back.get("<my-cat>").masks):
        assert torch.equal(a, b)


def test_save_refuses_names_outside_the_output_folder(tmp_path):
    cs = C.make_concept_set([C.make_concept("<a>", "dog", torch.rand(1, 8, 8, 3))])
    folder = UnconfusedSaveConceptSet().save(cs, "../../escape")["result"][0]
    assert (tmp_path / "output" / "unconfused" / "concept_sets") in __import__("pathlib").Path(folder).parents


def test_interrupted_save_is_not_read_as_complete(tmp_path, monkeypatch):
    cs = C.make_concept_set([C.make_concept("<a>", "dog", torch.rand(2, 8, 8, 3))])
    calls = {"n": 0}
    real = C.atomic_save_image

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user killed the process mid-save
        return real(*a, **k)

    monkeypatch.setattr(C, "atomic_save_image", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        C.save_concept_set(cs, tmp_path / "set")
    with pytest.raises(UnconfusedError, match="no concept_set.json"):
        UnconfusedLoadConceptSet().load(str(tmp_path / "set"))
    monkeypatch.undo()
    C.save_concept_set(cs, tmp_path / "set")  # a rerun completes it
    assert len(UnconfusedLoadConceptSet().load(str(tmp_path / "set"))["result"][0].concepts[0].images) == 2


def test_load_rejects_foreign_or_broken_manifest(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "concept_set.json").write_text("{not json")
    with pytest.raises(UnconfusedError, match="not valid JSON"):
        C.load_concept_set(tmp_path / "s")
    (tmp_path / "s" / "concept_set.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(UnconfusedError, match="not a concept set"):
        C.load_concept_set(tmp_path / "s")


def test_concept_from_folder_reads_photos_and_sidecars(dreambooth_dir, tmp_path):
    import shutil

    folder = tmp_path / "input" / "dog"
    shutil.copytree(dreambooth_dir / "dog2", folder)
    out = UnconfusedConceptFromFolder().make(str(folder), "<dog-x>", "dog")
    (concept,) = out["result"]
    n = len(list((dreambooth_dir / "dog2").glob("*.jpg")))
    assert len(concept.images) == n and concept.captions is None
    for p in folder.glob("*.jpg"):
        p.with_suffix(".txt").write_text(f"caption {p.stem}")
    (concept,) = UnconfusedConceptFromFolder().make(str(folder), "<dog-x>", "dog")["result"]
    assert concept.captions[0] == "caption 00"
    with pytest.raises(UnconfusedError, match="holds no images"):
        UnconfusedConceptFromFolder().make(str(tmp_path), "<dog-x>", "dog")


def test_one_concept_from_folder_and_one_spec_parser_for_every_caller(tmp_path):
    """engine.data.concepts.concept_from_folder / parse_concept_spec: the node, the command line and job files
    share them; a bad part is a sentence naming the input it came from."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (20 + i, 16), (200, 10 * i, 0)).save(folder / f"{i}.png")
    c = C.concept_from_folder(folder, " <red-x> ", " ball ")
    assert (c.token, c.class_word, c.names, c.captions) == ("<red-x>", "ball", ["0", "1"], None)
    assert [tuple(im.shape) for im in c.images] == [(16, 20, 3), (16, 21, 3)]
    for kwargs, needle, where in ((dict(token="ball"), "already a word", "token"),
                                  (dict(class_word=" "), "class word is empty", "class_word"),
                                  (dict(folder=tmp_path / "none"), "is not a folder", "folder")):
        args = {**dict(folder=folder, token="<red-x>", class_word="ball"), **kwargs}
        with pytest.raises(UnconfusedError, match=rf"input '{where}'.*{needle}"):
            C.concept_from_folder(**args)
        with pytest.raises(UnconfusedError, match=rf"input '--concept'.*{needle}"):
            C.concept_from_folder(input="--concept", **args)
    assert C.parse_concept_spec("photos/alice:<alice>:woman") == (
        __import__("pathlib").Path("photos/alice"), "<alice>", "woman")
    assert C.parse_concept_spec("C:/photos/alice:<alice>:woman")[0].as_posix() == "C:/photos/alice"
    for bad in ("photos/alice:<alice>", "photos/alice::woman", "<alice>:woman"):
        with pytest.raises(UnconfusedError, match=r"input 'concepts'.*is not FOLDER:TOKEN:CLASS"):
            C.parse_concept_spec(bad)


def test_one_iou_for_the_pack():
    """engine.vision.regions.iou: tensors or arrays, binarised at 0.5; two empty masks agree."""
    import numpy as np

    from unconfused.engine.vision.regions import iou

    a = torch.zeros(8, 8)
    a[:4] = 1
    b = torch.zeros(8, 8)
    b[2:6] = 0.9
    assert iou(a, b) == pytest.approx(16 / 48)
    assert iou(a.numpy() > 0.5, np.asarray(b) > 0.5) == pytest.approx(16 / 48)
    assert iou(a, a * 0.4) == 0.0 and iou(a * 0, b * 0) == 1.0 and iou(a, a) == 1.0
