"""CLIF augmentation builder: G-Aug / R-Aug / M-Aug pairs whose masks, captions and files agree,
determinism, Cancel + resume == one uninterrupted run, the bank cache, bad-input messages."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from unconfused.engine.data.augment.bank import BankSpec, bank_from_folder, generate_bank
from unconfused.engine.data.augment.build import AugmentSettings, build_dataset, records_digest
from unconfused.engine.data.augment.cutout import matte_plain_background
from unconfused.engine.data.augment.kinds import KINDS, aug_kind
from unconfused.engine.data.augment.preview import regions_preview
from unconfused.engine import host
from unconfused.engine.data.concepts import Concept, make_concept_set, pil_to_tensor
from unconfused.engine.data.augmented_dataset import Dataset, DatasetWriter, read_records
from unconfused.engine.errors import Cancelled, UnconfusedError

CANVAS = 128
# concept photos: three colour bands (top / middle / bottom) inside a rectangle on a grey photo
BANDS = {"<a>": [(255, 0, 0), (0, 255, 0), (0, 0, 255)], "<b>": [(255, 255, 0), (0, 255, 255), (255, 0, 255)]}
BANK = {"policeman": (0, 0, 128), "dog": (250, 128, 0)}
WORDS = {0: "hat", 1: "shirt", 2: "pants"}  # the band a stand-in region is labelled with


def band_concept(token: str, n: int = 2, size: int = 96) -> Concept:
    images, masks = [], []
    for k in range(n):
        img = np.full((size, size, 3), 90, np.uint8)
        img[:, :, 1] = 100 + 20 * k  # the photo's own background, not part of the concept
        m = np.zeros((size, size), np.float32)
        x0, x1, y0, y1 = 20 + 4 * k, 70 + 2 * k, 10, 88
        third = (y1 - y0) // 3
        for b, color in enumerate(BANDS[token]):
            img[y0 + b * third:y0 + (b + 1) * third, x0:x1] = color
        m[y0:y0 + 3 * third, x0:x1] = 1
        images.append(torch.from_numpy(img.astype(np.float32) / 255))
        masks.append(torch.from_numpy(m))
    return Concept(token, "toy", images, masks=masks)


def bank_folder(root, size: int = 96):
    for label, color in BANK.items():
        for k in range(2):
            img = Image.new("RGB", (size, size), (255, 255, 255))
            ImageDraw.Draw(img).ellipse([15 + 5 * k, 10, 75, 85], fill=color)
            (root / label).mkdir(parents=True, exist_ok=True)
            img.save(root / label / f"{k}.png")
    return root


def band_proposer(rgb: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Stand-in for SAM automatic mode: the mask split into three horizontal bands."""
    ys = torch.nonzero(mask >= 0.5)[:, 0]
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    out = []
    for b in range(3):
        m = torch.zeros_like(mask)
        m[y0 + (y1 - y0) * b // 3:y0 + (y1 - y0) * (b + 1) // 3] = 1
        out.append(m * (mask >= 0.5))
    return out


def colour_labeller(crops, vocabulary):
    """Stand-in for the CLIP labeller: the band a crop's colour belongs to."""
    out = []
    for c in crops:
        px = c.reshape(-1, 3)
        px = px[(px - 0.5).abs().amax(1) > 0.05]  # drop the neutral background
        mean = (px.mean(0) * 255).numpy()
        best = min(((np.abs(mean - np.array(col)).max(), b) for t in BANDS.values() for b, col in enumerate(t)))
        out.append((WORDS[best[1]], 1.0 - best[0] / 255))
    return out


def settings(**kw) -> AugmentSettings:
    base = dict(seed=3, canvas=CANVAS, global_pairs=6, region_pairs=6, mix_per_pair=2, min_regions=2,
                vocabulary=["hat", "shirt", "pants", "wheel"])
    base.update(kw)
    return AugmentSettings(**base)


def build(tmp_path, name="ds", cs=None, workers=None, **kw):
    cs = cs or make_concept_set([band_concept("<a>"), band_concept("<b>")])
    bank = bank_from_folder(bank_folder(tmp_path / "bank"))
    return build_dataset(cs, tmp_path / name, settings(**kw), bank=bank, proposer=band_proposer,
                           labeller=colour_labeller, workers=workers)


def load(folder, rel, mode):
    with Image.open(folder / rel) as im:
        return np.asarray(im.convert(mode)).astype(np.int16)


def palette_of(label: str) -> list[tuple]:
    token = re.match(r"(<[^>]+>)", label)
    if token:
        return BANDS[token.group(1)]
    return [BANK[label.split(" (")[0]]]


def test_masks_cover_their_pixels_and_captions_name_what_is_present(tmp_path):
    res = build(tmp_path)
    assert res.counts == {"global": 6, "region": 6, "mix": 2}
    ds = Dataset(tmp_path / "ds")
    assert ds.complete and len(ds) == 14
    kinds_seen = set()
    for r in ds.records:
        kinds_seen.add(r.kind)
        img = load(ds.folder, r.image, "RGB")
        bg = np.array(r.source["background"])
        union = np.zeros(img.shape[:2], bool)
        assert [e["label"] for e in r.source["elements"]] == [k.split(" (")[0] for k in r.masks]
        for (label, rel), element in zip(r.masks.items(), r.source["elements"]):
            m = load(ds.folder, rel, "L")
            assert set(np.unique(m)) <= {0, 255}
            m = m == 255
            assert m.sum() > 20, f"{r.id}: element {label} is not visible"
            assert not (m & union).any(), f"{r.id}: masks overlap"
            union |= m
            # the pixels under an element's mask are that element's colours (nothing of the background)
            pal = np.array(palette_of(label))
            dist = np.abs(img[m][:, None, :] - pal[None]).max(-1).min(-1)
            assert (dist <= 12).mean() > 0.9, f"{r.id}: mask of {label} covers other pixels"
            assert (np.abs(img[m] - bg).max(-1) > 30).mean() > 0.97, f"{r.id}: mask of {label} covers background"
            box = element["box"]
            ys, xs = np.nonzero(m)
            assert box[0] <= xs.min() and xs.max() < box[2] and box[1] <= ys.min() and ys.max() < box[3]
        # every pasted pixel is under some mask: outside the masks there is only background
        assert (img[~union] == bg).all(), f"{r.id}: pixels of an element lie outside its mask"
        # the caption names exactly the concepts present, and every common concept present
        named = set(re.findall(r"<[^>]+>", r.caption))
        present = {re.match(r"(<[^>]+>)", k).group(1) for k in r.masks if k.startswith("<")}
        assert named == set(r.tokens) == present, r
        for label in r.masks:
            assert label.split(" (")[0] in r.caption
        if r.kind == "mix":
            assert len(r.tokens) == 2 and r.caption.count("<") == 2
            left = min(r.source["elements"], key=lambda e: e["box"][0])["label"]
            assert r.caption.index(left) < r.caption.index(({"<a>", "<b>"} - {left}).pop())
        if r.kind == "region":
            assert re.search(r"<[ab]>'s (hat|shirt|pants)", r.caption)
            for label in r.masks:
                if label.startswith("<"):  # "<a>'s hat" shows only the hat band's colour
                    word = label.split("'s ")[1]
                    band = {v: k for k, v in WORDS.items()}[word]
                    m = load(ds.folder, r.masks[label], "L") == 255
                    col = np.array(BANDS[label[:3]][band])
                    assert (np.abs(img[m] - col).max(-1) <= 12).mean() > 0.9
    assert kinds_seen == {"global", "region", "mix"}
    regions = json.loads((ds.folder / "regions.json").read_text())["regions"]
    assert {e["label"] for e in regions} == {f"{t}'s {w}" for t in ("<a>", "<b>") for w in WORDS.values()}
    sheet = regions_preview(ds.folder)
    assert sheet is not None and sheet.width > 0
    assert regions_preview(tmp_path / "bank") is None
    # M-Aug: the pair is shown both ways round
    mixes = ds.of_kind("mix")
    assert {tuple(m.tokens) for m in mixes} == {("<a>", "<b>"), ("<b>", "<a>")}


def test_deterministic_per_seed(tmp_path):
    build(tmp_path, "one", global_pairs=4, region_pairs=3, workers=3)
    build(tmp_path, "two", global_pairs=4, region_pairs=3, workers=1)  # one thread writes the same bytes
    build(tmp_path, "other", global_pairs=4, region_pairs=3, seed=4)
    assert records_digest(tmp_path / "one") == records_digest(tmp_path / "two")
    assert records_digest(tmp_path / "one") != records_digest(tmp_path / "other")


def test_cancel_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    build(tmp_path, "full")
    real_add = DatasetWriter.add
    calls = {"n": 0}

    def add(self, *a, **kw):
        rec = real_add(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 7:  # the user presses Cancel in the middle of the region pairs
            host.request_cancel()
        return rec

    monkeypatch.setattr(DatasetWriter, "add", add)
    with pytest.raises(Cancelled):
        build(tmp_path, "cut")
    part = Dataset(tmp_path / "cut")
    assert not part.complete and len(part) == 7 and "INCOMPLETE" in part.describe()
    with open(tmp_path / "cut" / "records.jsonl", "a") as f:  # and a write cut off by a crash
        f.write('{"id": "region_000001", "kind": "reg')
    monkeypatch.setattr(DatasetWriter, "add", real_add)
    res = build(tmp_path, "cut")
    assert res.made == 14 - 7 and Dataset(tmp_path / "cut").complete
    assert [r.id for r in read_records(tmp_path / "cut")] == [r.id for r in read_records(tmp_path / "full")]
    assert records_digest(tmp_path / "cut") == records_digest(tmp_path / "full")
    # a rerun of a complete dataset makes nothing and changes nothing
    assert build(tmp_path, "cut").made == 0
    assert records_digest(tmp_path / "cut") == records_digest(tmp_path / "full")
    # other settings with the same name are refused, not mixed in
    with pytest.raises(UnconfusedError, match="other settings"):
        build(tmp_path, "cut", mix_per_pair=3)
    with pytest.raises(UnconfusedError, match="other settings"):
        build(tmp_path, "cut", global_pairs=5)  # shrinking is not growing
    # larger G-Aug / R-Aug counts grow the dataset: only the new pairs are made, and the result is
    # what a fresh run with the larger counts writes
    res = build(tmp_path, "cut", global_pairs=8, region_pairs=7)
    assert res.made == 3 and "global_pairs 6 -> 8" in res.info()
    build(tmp_path, "fresh", global_pairs=8, region_pairs=7)
    assert records_digest(tmp_path / "cut") != records_digest(tmp_path / "fresh")  # order on disk differs
    assert sorted(read_records(tmp_path / "cut"), key=lambda r: r.id) == \
        sorted(read_records(tmp_path / "fresh"), key=lambda r: r.id)
    for r in read_records(tmp_path / "fresh"):
        for rel in [r.image, *r.masks.values()]:
            assert (tmp_path / "cut" / rel).read_bytes() == (tmp_path / "fresh" / rel).read_bytes()
    assert Dataset(tmp_path / "cut").complete


def test_mix_pairs_cover_every_pair(tmp_path):
    cs = make_concept_set([band_concept("<a>"), band_concept("<b>"),
                           Concept("<c>", "toy", band_concept("<a>").images, masks=band_concept("<a>").masks)])
    res = build_dataset(cs, tmp_path / "m", settings(global_pairs=0, region_pairs=0, mix_per_pair=3))
    assert res.counts == {"mix": 9}
    pairs = [frozenset(r.tokens) for r in read_records(tmp_path / "m")]
    assert {p: pairs.count(p) for p in set(pairs)} == {frozenset(p): 3 for p in
                                                      [("<a>", "<b>"), ("<a>", "<c>"), ("<b>", "<c>")]}


def test_bad_inputs_are_named(tmp_path):
    bank = bank_from_folder(bank_folder(tmp_path / "bank"))
    a, b = band_concept("<a>"), band_concept("<b>")
    no_masks = Concept("<a>", "toy", a.images)
    with pytest.raises(UnconfusedError, match=r"input 'concept_set'.*<a> has no masks.*Concept Cut-out SAM\+CLIP"):
        build_dataset(make_concept_set([no_masks, b]), tmp_path / "x", settings(region_pairs=0), bank=bank)
    tiny = Concept("<a>", "toy", a.images, masks=[torch.zeros(96, 96) for _ in a.images])
    with pytest.raises(UnconfusedError, match=r"input 'concept_set'.*no usable cut-out"):
        build_dataset(make_concept_set([tiny, b]), tmp_path / "x", settings(region_pairs=0), bank=bank)
    with pytest.raises(UnconfusedError, match=r"input 'mix_per_pair'.*at least two concepts"):
        build_dataset(make_concept_set([a]), tmp_path / "x", settings(region_pairs=0), bank=bank)
    with pytest.raises(UnconfusedError, match=r"input 'vocabulary'.*vocabulary is empty"):
        build_dataset(make_concept_set([a, b]), tmp_path / "x", settings(vocabulary=[]), bank=bank,
                        proposer=band_proposer, labeller=colour_labeller)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UnconfusedError, match=r"input 'bank_folder'.*holds no images"):
        bank_from_folder(tmp_path / "empty")
    with pytest.raises(UnconfusedError, match=r"input 'region_pairs'.*no labelled regions"):
        build_dataset(make_concept_set([a, b]), tmp_path / "y", settings(vocabulary=["wheel"]), bank=bank,
                        proposer=band_proposer, labeller=colour_labeller)
    with pytest.raises(UnconfusedError, match=r"input 'templates'.*exactly once"):
        build_dataset(make_concept_set([a, b]), tmp_path / "x", settings(templates=["a photo"]), bank=bank)
    with pytest.raises(UnconfusedError, match=r"input 'sam_model'"):
        build_dataset(make_concept_set([a, b]), tmp_path / "x", settings(), bank=bank)
    with pytest.raises(UnconfusedError, match=r"input 'model'.*common concepts"):
        build_dataset(make_concept_set([a, b]), tmp_path / "x", settings(region_pairs=0))
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy / "dog_1.png")
    with pytest.raises(UnconfusedError, match=r"input 'bank_folder'.*could be cut out.*whole image"):
        build_dataset(make_concept_set([a, b]), tmp_path / "x", settings(region_pairs=0),
                        bank=bank_from_folder(noisy))
    # a full disk: the message says the dataset resumes; what was written stays readable
    real_save = DatasetWriter.add

    def full_disk(self, *args, **kw):
        if len(self) == 3:
            raise UnconfusedError("could not write (No space left on device); free some space and run again - the "
                                  "dataset resumes where it stopped", input="name")
        return real_save(self, *args, **kw)

    DatasetWriter.add = full_disk
    try:
        with pytest.raises(UnconfusedError, match="resumes"):
            build_dataset(make_concept_set([a, b]), tmp_path / "disk", settings(region_pairs=0), bank=bank)
    finally:
        DatasetWriter.add = real_save
    assert not Dataset(tmp_path / "disk").complete and len(Dataset(tmp_path / "disk")) == 3


def test_plain_background_matte():
    img = np.full((80, 80, 3), 240, np.uint8)
    truth = np.zeros((80, 80), bool)
    yy, xx = np.mgrid[:80, :80]
    truth[(yy - 40) ** 2 + (xx - 35) ** 2 < 20 ** 2] = True
    img[truth] = (200, 30, 30)
    img[38:42, 30:40] = (238, 238, 238)  # a highlight inside the object is not a hole
    fg = matte_plain_background(img)
    assert fg is not None and (fg & truth).sum() / (fg | truth).sum() > 0.95
    noise = np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    assert matte_plain_background(noise) is None
    # a studio gradient with a vignette, and a thing standing on the bottom edge
    yy, xx = np.mgrid[:96, :96]
    grad = 170 + 60 * (xx / 95) - 30 * ((yy - 48) ** 2 + (xx - 48) ** 2) / 48 ** 2
    img = np.repeat(grad[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)
    truth = (np.abs(xx - 45) < 14) & (yy > 30)
    img[truth] = (40, 60, 160)
    fg = matte_plain_background(img)
    assert fg is not None and (fg & truth).sum() / (fg | truth).sum() > 0.95


def test_bank_generation_is_cached_and_resumes(tmp_path, monkeypatch, tiny):
    from unconfused.engine.models import sampling

    made = []
    real = sampling.generate

    def counting(bundle, prompts, **kw):
        made.extend(prompts)
        if len(made) == 3:
            host.request_cancel()
        return real(bundle, prompts, **kw)

    monkeypatch.setattr(sampling, "generate", counting)
    spec = BankSpec(phrases=["a policeman", "a pair of jeans"], per_concept=2, steps=1, size=64)
    with pytest.raises(Cancelled):
        generate_bank(tiny, spec, matte="whole image")
    assert len(made) == 3
    files = sorted((host.output_dir() / "unconfused" / "banks").rglob("*.png"))
    assert len(files) == 2  # the two finished images are kept; the third was cancelled mid-sampling
    bank = generate_bank(tiny, spec, matte="whole image")
    assert len(made) == 5 and len(bank) == 4  # only the two missing ones were generated
    assert {it.label for it in bank.items} == {"policeman", "jeans"}
    assert {it.phrase for it in bank.items} == {"a policeman", "a pair of jeans"}
    generate_bank(tiny, spec, matte="whole image")
    assert len(made) == 5  # nothing left to make
    assert "a pair of jeans" in json.dumps(json.loads((bank.cache_dir / "bank.json").read_text()))


@pytest.fixture(scope="module")
def tiny():
    from tiny_models import tiny_bundle

    return tiny_bundle()


def test_nodes_with_real_photos_and_generated_bank(tmp_path, tiny, dreambooth_dir):
    """DreamBooth photos (centre-ellipse masks standing in for SAM), the bank generated by the small
    random model, the builder -> loader -> preview nodes, and the LoRA trainer's view of the dataset."""
    from unconfused.nodes import augment as N

    def photos(name):
        out = []
        for p in sorted((dreambooth_dir / name).glob("*.jpg"))[:2]:
            with Image.open(p) as im:
                out.append(pil_to_tensor(im.resize((96, 96))))
        return out

    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    ellipse = (((yy - 50) / 40) ** 2 + ((xx - 48) / 30) ** 2 < 1).float()
    cs = make_concept_set([Concept("<dog2>", "dog", photos("dog2"), masks=[ellipse, ellipse]),
                           Concept("<cat>", "cat", photos("cat"), masks=[ellipse, ellipse])])
    node = N.UnconfusedAugmentBuilder()
    out = node.build(concept_set=cs, name="nodes", seed=1, global_pairs=4, region_pairs=0, mix_per_pair=2,
                     canvas=CANVAS, resume="auto", model=tiny, common_concepts="a policeman\na dog",
                     images_per_common=1, bank_steps=2, bank_size=64, bank_matte="whole image")
    ds, info, grid = out["result"]
    assert ds.complete and len(ds) == 6 and "6 pairs" in info and grid.shape[0] == 1
    assert out["ui"]["images"]
    loaded, text = N.UnconfusedLoadDataset().load(name="nodes")
    assert len(loaded) == 6 and "complete" in text
    examples = list(loaded.examples(("mix",)))
    assert len(examples) == 2 and examples[0].mask.shape == (CANVAS, CANVAS)
    assert float(examples[0].mask.sum()) > 100
    shown = N.UnconfusedDatasetPreview().show(dataset=loaded, count=4, kind="global", seed=0, show_masks=True)
    assert shown["result"][0].shape[-1] == 3
    with pytest.raises(UnconfusedError, match=r"input 'name'.*no dataset"):
        N.UnconfusedLoadDataset().load(name="missing")
    with pytest.raises(UnconfusedError, match=r"input 'region_pairs'|input 'sam_model'"):
        node.build(concept_set=cs, name="nodes2", seed=1, global_pairs=1, region_pairs=2, mix_per_pair=0,
                   canvas=CANVAS, resume="auto", model=tiny, common_concepts="a dog", images_per_common=1,
                   bank_steps=2, bank_size=64, bank_matte="whole image")


def test_builder_node_accepts_every_declared_input(tmp_path):
    """Every input the node declares (with its default) reaches the engine: no typo between the
    socket names and the settings."""
    from unconfused.nodes import augment as N

    spec = N.UnconfusedAugmentBuilder.INPUT_TYPES()
    kwargs = {k: v[1]["default"] for part in ("required", "optional") for k, v in spec[part].items()
              if len(v) > 1 and "default" in v[1]}
    assert set(kwargs) | {"concept_set", "model", "sam_model", "clip_model"} == \
        set(spec["required"]) | set(spec["optional"])
    bank_folder(tmp_path / "input" / "bank")
    kwargs.update(global_pairs=2, region_pairs=0, mix_per_pair=1, canvas=CANVAS, preview_count=2,
                  bank_folder=str(tmp_path / "input" / "bank"), vocabulary="antenna, visor")
    out = N.UnconfusedAugmentBuilder().build(concept_set=make_concept_set([band_concept("<a>"), band_concept("<b>")]),
                                             **kwargs)
    ds = out["result"][0]
    assert len(ds) == 3 and ds.manifest["settings"]["vocabulary"][-2:] == ["antenna", "visor"]
    assert ds.manifest["settings"]["max_common"] == AugmentSettings().max_common


def test_region_tools_adapt_the_masks_stage(tmp_path):
    """The SAM / CLIP socket values become the engine's proposer and labeller (engine/vision/regions.py);
    a model without the method is a sentence naming the input."""
    from unconfused.engine.vision import regions as N

    class Sam:
        def propose_regions(self, rgb, mask):
            return band_proposer(rgb, mask)

    class Clip:
        def label_regions(self, crops, words):
            return colour_labeller(crops, words)

    proposer, labeller = N.region_tools(Sam(), Clip())
    cs = make_concept_set([band_concept("<a>"), band_concept("<b>")])
    res = build_dataset(cs, tmp_path / "r", settings(global_pairs=0, region_pairs=4, mix_per_pair=0,
                                                       region_common=0), proposer=proposer, labeller=labeller)
    assert res.counts == {"region": 4}
    with pytest.raises(UnconfusedError, match=r"input 'clip_model'.*region labelling"):
        N.region_tools(Sam(), object())
    with pytest.raises(UnconfusedError, match=r"input 'sam_model'.*region proposal"):
        N.region_tools(object(), Clip())


def test_region_aug_with_the_masks_stage_models(tmp_path):
    """R-Aug through the real SAM automatic mode and open_clip labeller of the masks stage (small
    random-weight models, loose SAM thresholds so random weights still propose regions)."""
    pytest.importorskip("segment_anything")
    open_clip = pytest.importorskip("open_clip")
    from sam_helpers import TINY_SAM, register_tiny_clip, tiny_sam

    from unconfused.engine.vision.clip_zero_shot import ClipScorer
    from unconfused.engine.vision import regions as N
    from unconfused.engine.vision.sam import SamConfig, SamModel

    name = register_tiny_clip()
    torch.manual_seed(0)
    clip = ClipScorer(open_clip.create_model(name, pretrained=None), name, device="cpu")
    sam = SamModel(tiny_sam(), SamConfig(**TINY_SAM), device="cpu")
    proposer, labeller = N.region_tools(sam, clip, points_per_side=4, pred_iou_thresh=0.0,
                                        stability_thresh=0.0)
    cs = make_concept_set([band_concept("<a>", n=1), band_concept("<b>", n=1)])
    res = build_dataset(cs, tmp_path / "sam", settings(global_pairs=0, region_pairs=3, mix_per_pair=0,
                                                         region_common=0, min_regions=1),
                          proposer=proposer, labeller=labeller)
    assert res.counts == {"region": 3}
    words = {"hat", "shirt", "pants", "wheel"}
    for r in read_records(tmp_path / "sam"):
        assert r.masks and all(k.split("'s ", 1)[1] in words for k in r.masks)
        assert all(k in r.caption for k in r.masks)


def test_bank_images_are_the_same_alone_or_batched(tmp_path, tiny):
    spec = BankSpec(phrases=["a policeman", "a dog"], per_concept=2, steps=1, size=64)
    one = generate_bank(tiny, spec, folder=tmp_path / "one", matte="whole image", batch_size=1)
    three = generate_bank(tiny, spec, folder=tmp_path / "three", matte="whole image", batch_size=3)
    assert [it.key for it in one.items] == [it.key for it in three.items]
    for a, b in zip(one.items, three.items):
        x = np.asarray(Image.open(a.image)).astype(int)
        y = np.asarray(Image.open(b.image)).astype(int)
        assert np.abs(x - y).max() <= 1


def test_a_pair_kind_is_one_registered_function(tmp_path):
    """The kind registry is what the build, the counts and the dataset read: a kind registered with
    @aug_kind (here: a concept alone, no bank) is built, counted, resumed and accepted as a record kind
    with no other change; the three paper kinds keep their ids (each pair's random stream)."""
    assert {k: v.id for k, v in KINDS.items()} == {"global": 1, "region": 2, "mix": 3}

    @aug_kind("solo", 9, "test", "a concept alone", count=lambda s, n: 2 * n)
    def _solo(b, index, rng):
        return [b._concept_piece(index % len(b.concepts), rng)]

    try:
        s = settings(global_pairs=0, region_pairs=0, mix_per_pair=1)
        assert s.counts(2) == {"global": 0, "region": 0, "mix": 1, "solo": 4} and not s.needs_bank(2)
        cs = make_concept_set([band_concept("<a>"), band_concept("<b>")])
        res = build_dataset(cs, tmp_path / "solo", s)  # no bank, no region tools needed
        assert res.counts == {"mix": 1, "solo": 4}
        recs = [r for r in read_records(tmp_path / "solo") if r.kind == "solo"]
        assert [r.tokens for r in recs] == [["<a>"], ["<b>"], ["<a>"], ["<b>"]]
        assert all(len(r.masks) == 1 for r in recs)
        with pytest.raises(ValueError, match="taken"):
            aug_kind("again", 9, "", "", count=lambda s, n: 0)(_solo)
    finally:
        del KINDS["solo"]
    assert "solo" not in AugmentSettings().counts(2)

