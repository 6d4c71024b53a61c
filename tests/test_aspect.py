"""Any aspect ratio: attention maps kept h x w (never a square guess) through the capture, the
sampler's debugger and the evaluation, and the training buckets (engine/data/buckets.py)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from tiny_models import tiny_bundle
from unconfused.engine.data import buckets as B
from unconfused.engine.evaluation import metrics as M
from unconfused.engine.models import sampling as S
from unconfused.engine.vision.attention import AttentionCapture, token_position_mask
from unconfused.engine.models.concept_tokens import add_concept_tokens

SIZES = [(96, 64), (64, 96)]  # (width, height): wide and tall
PROMPT = "a photo of <a> on grass"


@pytest.fixture(scope="module")
def bundle():
    b = tiny_bundle()
    add_concept_tokens(b, [("<a>", "dog"), ("<b>", "cat")])
    return b


def _left_attention(monkeypatch, bundle, latent_w: int):
    """Every captured layer attends from the left half of the latent (columns < w/2, in the UNet's
    row-major flattening of a layer that runs at the full latent size) to <a>, from the right
    half to the start token: a known pattern the maps must show on the left."""
    a = int(token_position_mask(bundle, [PROMPT], ["<a>"])[0, 0].nonzero()[0])

    def scores(self, query, key, attention_mask=None):
        n, hw, t = query.shape[0], query.shape[1], key.shape[1]
        assert hw % latent_w == 0, "the pattern is built for layers at the full latent size"
        left = (torch.arange(hw) % latent_w) < latent_w // 2
        probs = torch.zeros(n, hw, t, dtype=query.dtype)
        probs[:, left, a] = 1
        probs[:, ~left, 0] = 1
        return probs

    monkeypatch.setattr(Attention, "get_attention_scores", scores)


@pytest.mark.parametrize("width,height", SIZES)
def test_capture_keeps_the_latent_shape_at_every_level(bundle, width, height):
    """A 8x12 latent gives 8x12 maps at the full level and 4x6 in the mid block; 13x20 (not a
    multiple of the UNet's stride) gives ceil: 7x10. Today's isqrt reshape raises here."""
    levels = [n for n in bundle.unet.attn_processors if n.endswith("attn2.processor")]
    layers = [n[: -len(".processor")] for n in levels]
    for h, w in ((height // 8, width // 8), (13, 20) if width > height else (20, 13)):
        x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
        with AttentionCapture(bundle.unet, layers) as cap, torch.no_grad():
            cap.watch(torch.ones(1, 1, 77))  # every prompt position: each map is all ones
            bundle.unet(x, torch.tensor([500]), bundle.encode_prompt(["<a>"]))
            sizes = {tuple(m.shape[-2:]) for m in cap._sum.values()}
            maps = cap.maps()
            assert cap.maps((5, 3)).shape[-2:] == (5, 3)
        assert sizes == {(h, w), (math.ceil(h / 2), math.ceil(w / 2))}
        assert maps.shape == (1, 1, h, w) and torch.allclose(maps, torch.ones_like(maps), atol=1e-5)


@pytest.mark.parametrize("width,height", SIZES)
def test_debugger_map_keeps_a_left_pattern_on_the_left(bundle, monkeypatch, width, height):
    _left_attention(monkeypatch, bundle, width // 8)
    r = S.sample(bundle, PROMPT, negative="", steps=2, width=width, height=height, seed=1, debug_attention=True)
    assert r.images.shape == (1, height, width, 3) and r.maps.shape == (1, 2, height, width)
    m = r.maps[0, 0]
    half = width // 2
    assert float(m[:, : half - 8].min()) > 0.99 and float(m[:, half + 8:].max()) < 0.01  # left, not top
    assert float(r.maps[0, 1].abs().max()) == 0  # <b> is not in the prompt
    assert r.overlay().size[0] >= 64


@pytest.mark.parametrize("width,height", SIZES)
def test_sampler_node_and_evaluate_read_non_square_maps(bundle, monkeypatch, width, height):
    """The sampler node's attention masks, handed to the Evaluate node as region masks, put <a>
    on the left of each image: with pictures red on the left and green on the right, every <a>
    region matches <a>'s red references (confusion diagonal)."""
    from unconfused import NODE_CLASS_MAPPINGS
    from unconfused.engine.data.concepts import Concept, ConceptSet
    from unconfused.nodes.evaluate import UnconfusedEvaluate

    _left_attention(monkeypatch, bundle, width // 8)
    with torch.inference_mode():
        out = NODE_CLASS_MAPPINGS["UnconfusedSample"]().sample(bundle, PROMPT, "", "ddim", 2, 7.5, width, height, 0,
                                                                2, 1.0, True)
    images, latent, masks, _preview, _info = out["result"]
    assert images.shape == (2, height, width, 3) and latent["samples"].shape == (2, 4, height // 8, width // 8)
    assert masks.shape == (4, height, width)  # 2 images x 2 tokens, image-major

    pictures = torch.zeros(2, height, width, 3)
    pictures[:, :, : width // 2, 0] = 1  # red left
    pictures[:, :, width // 2:, 1] = 1  # green right

    class Colour:
        name = "colour"

        def image_features(self, ims):
            return torch.nn.functional.normalize(torch.stack([im.reshape(-1, 3).mean(0) for im in ims]), dim=-1)

        def text_features(self, texts):
            return torch.nn.functional.normalize(torch.ones(len(texts), 3), dim=-1)

    red, green = torch.zeros(height, width, 3), torch.zeros(height, width, 3)
    red[..., 0], green[..., 1] = 1, 1
    cs = ConceptSet([Concept("<a>", "dog", [red]), Concept("<b>", "cat", [green])])
    evaluate = getattr(UnconfusedEvaluate.evaluate, "__wrapped__", UnconfusedEvaluate.evaluate)
    table, confusion, _att = evaluate(UnconfusedEvaluate(), pictures, PROMPT, cs, Colour(), region_masks=masks,
                                      model=bundle, save=False)["result"]
    assert "2/2 regions matched" in table
    # and straight through the engine: the region of <a> is the left half of a non-square image
    regions = [[masks[2 * i], None] for i in range(2)]
    report = M.evaluate(list(pictures), [PROMPT] * 2, [M.Reference("<a>", "dog", [red]),
                                                         M.Reference("<b>", "cat", [green])], Colour(),
                        region_masks=regions)
    assert report.confusion.tolist() == [[2, 0], [0, 0]]


# ------------------------------------------------------------------ buckets
def test_bucket_list_for_an_area_and_step():
    sizes = B.bucket_sizes(512, 64)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2
        assert (h, w) in sizes  # every wide bucket has its tall twin
        assert (w + 64) * h > 512 * 512 or (w + 64) > 704  # no bucket could grow a step and stay in the area
    assert sizes == sorted(sizes, key=lambda s: s[0] / s[1])
    assert all(w * h >= 0.85 * 768 * 768 for w, h in B.bucket_sizes(768, 64))
    with pytest.raises(ValueError):
        B.bucket_sizes(500, 64)


def test_nearest_bucket_by_aspect_ratio():
    sizes = B.bucket_sizes(512, 64)
    assert B.nearest_bucket(1000, 1000, sizes) == (512, 512)
    assert B.nearest_bucket(768, 512, sizes) == (640, 384)  # 3:2 is nearer 5:3 than 9:7 in log ratio
    assert B.nearest_bucket(512, 768, sizes) == (384, 640)
    assert B.nearest_bucket(4000, 100, sizes) == max(sizes, key=lambda s: s[0] / s[1])  # widest there is
    chosen, groups = B.assign_buckets([(1024, 1024), (600, 400), (400, 600), (300, 300)])
    assert chosen == [(512, 512), (640, 384), (384, 640), (512, 512)] and groups[(512, 512)] == [0, 3]


def test_fit_to_bucket_resizes_and_crops_image_and_mask_together():
    h, w = 300, 600  # a 2:1 photo into a 5:3 bucket: scaled to cover, the sides cropped
    image = torch.zeros(h, w, 3)
    image[:, :, 2] = torch.linspace(0, 1, w)  # blue ramps left to right
    image[100:200, 250:350, 0] = 1  # a red square in the middle ...
    mask = torch.zeros(h, w)
    mask[100:200, 250:350] = 1  # ... and its mask
    img, m = B.fit_to_bucket(image, mask, (640, 384))
    assert img.shape == (384, 640, 3) and m.shape == (384, 640)
    red = img[..., 0] > 0.5
    assert ((m > 0.5) == red).float().mean() > 0.995  # the mask still covers exactly the square
    assert abs(float((m > 0.5).float().mean()) - 100 * 100 * 1.28 ** 2 / (384 * 640)) < 0.01  # scale 384/300
    assert float(img[:, 0, 2].mean()) < float(img[:, -1, 2].mean())  # not mirrored
    assert float(img[:, 0, 2].mean()) > 0.05  # the left edge was cropped away (the ramp starts above 0)
    tall, tall_mask = B.fit_to_bucket(image.transpose(0, 1), mask.T, (384, 640))
    assert tall.shape == (640, 384, 3) and torch.allclose(tall_mask, m.T, atol=1e-4)
    with pytest.raises(ValueError, match="mask is"):
        B.fit_to_bucket(image, mask.T, (640, 384))
