"""Training with aspect-ratio buckets: each photo trains at the bucket nearest its shape (LoRA and
mask EM), masks follow their photo through the fit and the flips, a batch draws from one bucket,
square photos train exactly as before buckets existed, and a bucketed run resumes exactly."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_bundle
from unconfused.engine import host
from unconfused.engine.data.buckets import bucket_sizes
from unconfused.engine.data.concepts import Concept, make_concept_set
from unconfused.engine.errors import Cancelled, UnconfusedError
from unconfused.engine.data.training_examples import Example, fit_square, prepare
from unconfused.trainers import em as E
from unconfused.trainers.loop import seed_everything
from unconfused.trainers.lora import LoraSettings, LoraTrainer
from unconfused.engine.data.synthetic import synthetic_photos

RES = 128  # buckets of area 128^2, step 64: 64x128, 128x128, 128x64


@pytest.fixture(scope="module")
def base():
    return tiny_bundle()


def photos(seed: int, n: int, width: int, height: int) -> list[torch.Tensor]:
    """Synthetic photos [height, width, 3] (a crop of larger synthetic squares)."""
    return [p[:height, :width] for p in synthetic_photos(seed, n, max(width, height))]


def left_mask(width: int, height: int, frac: float = 0.25) -> torch.Tensor:
    m = torch.zeros(height, width)
    m[:, : int(width * frac)] = 1
    return m


def wide_and_tall():
    """<a>: wide 96x64 photos (a mask on their left quarter); <b>: tall 64x96 photos."""
    return make_concept_set([
        Concept("<a>", "dog", photos(0, 2, 96, 64), masks=[left_mask(96, 64)] * 2),
        Concept("<b>", "cat", photos(1, 2, 64, 96)),
    ])


def settings(**kw) -> LoraSettings:
    base = dict(name="bk", steps=4, resolution=RES, rank=4, alpha=4.0, checkpoint_every=100, resume="restart",
                export=False, batch_size=2)
    base.update(kw)
    return LoraSettings(**base)


class Recording(LoraTrainer):
    """Records the latent shape and the captions of every UNet call."""

    def call_unet(self, noisy, timesteps, cond, batch=None):
        self.seen.append((tuple(noisy.shape), list(batch.captions) if batch is not None else None))
        return super().call_unet(noisy, timesteps, cond, batch)


def test_buckets_for_the_test_resolution():
    assert bucket_sizes(RES) == [(64, 128), (128, 128), (128, 64)]


def test_square_photos_and_the_square_option_prepare_exactly_as_before():
    """Today's centre crop (`fit_square`) is what `aspect = square` gives for any photo, and what
    buckets give for square photos - bit for bit, so existing runs train (and resume) as before."""
    wide = Example(photos(2, 1, 96, 64)[0], "x", left_mask(96, 64), ["<a>"])
    square = Example(synthetic_photos(3, 1, 80)[0], "y", left_mask(80, 80), ["<a>"])
    for examples, aspect in (([wide, square], "square"), ([square], "buckets")):
        d = prepare(examples, RES, aspect=aspect)
        for e, px, m in zip(examples, d.pixels, d.masks):
            assert torch.equal(px, fit_square(e.image.permute(2, 0, 1), RES) * 2 - 1)
            assert torch.equal(m, fit_square(e.mask[None], RES).clamp(0, 1))
    assert prepare([wide, square], RES).sizes == [(128, 64), (128, 128)]


def test_lora_trains_each_photo_at_its_bucket(base):
    """Wide photos train as 16x8 latents (128x64 pixels), tall ones as 8x16; every batch holds one
    bucket; the cached latents and masks have their bucket's size."""
    tr = Recording(base, wide_and_tall(), settings(steps=6))
    tr.seen = []
    assert tr.data.sizes == [(128, 64)] * 2 + [(64, 128)] * 2
    assert [tuple(t.shape) for t in tr.data.latents] == [(4, 8, 16)] * 2 + [(4, 16, 8)] * 2
    assert [tuple(t.shape) for t in tr.data.masks] == [(1, 64, 128)] * 2 + [(1, 128, 64)] * 2
    assert tr.loop.config["sizes"] == ["128x64", "128x64", "64x128", "64x128"]
    tr.run()
    assert len(tr.seen) == 6
    shapes = {shape for shape, _ in tr.seen}
    assert shapes == {(2, 4, 8, 16), (2, 4, 16, 8)}  # both buckets were drawn, each batch of one
    for shape, captions in tr.seen:
        token = "<a>" if shape[-1] > shape[-2] else "<b>"
        assert all(token in c for c in captions), (shape, captions)


def test_square_option_centre_crops_every_photo(base):
    tr = Recording(base, wide_and_tall(), settings(steps=2, aspect="square"))
    tr.seen = []
    tr.run()
    assert {shape for shape, _ in tr.seen} == {(2, 4, 16, 16)}
    assert "sizes" not in tr.loop.config and "aspect" not in tr.loop.config["settings"]


def test_mask_follows_its_photo_through_bucket_and_flip(base):
    """A mask on the left quarter of a wide photo is on the left quarter of its bucket; in every drawn
    batch the mask is on the right exactly when the latent is the flipped photo's."""
    cs = make_concept_set([Concept("<a>", "dog", photos(4, 2, 192, 96), masks=[left_mask(192, 96)] * 2)])
    tr = LoraTrainer(base, cs, settings())
    assert tr.data.sizes == [(128, 64)] * 2
    m = tr.data.masks[0][0]
    assert float(m[:, :28].min()) == 1 and float(m[:, 36:].max()) == 0  # left quarter of 128 wide
    plain = torch.stack(tr.data.latents)
    flipped = torch.stack(tr.data.latents_flipped)
    sides = set()
    for _ in range(6):
        batch = tr.draw_batch(tr.data, 2)
        assert batch.latents.shape[-2:] == (8, 16) and batch.masks.shape[-2:] == (8, 16)
        for lat, mask in zip(batch.latents, batch.masks[:, 0]):
            was_flipped = any(torch.equal(lat, f) for f in flipped)
            assert was_flipped != any(torch.equal(lat, p) for p in plain)
            left, right = float(mask[:, :3].mean()), float(mask[:, -3:].mean())  # the mask covers 4 of 16 columns
            assert (round(left, 2), round(right, 2)) == ((0.0, 1.0) if was_flipped else (1.0, 0.0))
            sides.add(was_flipped)
    assert sides == {True, False}  # both ways were drawn


def test_bucketed_resume_equals_uninterrupted_run(base):
    cs = wide_and_tall()
    seed_everything(0)  # the LoRA's random init, as train_lora does
    full = LoraTrainer(base, cs, settings(name="full", steps=6))
    full.run()
    want = {k: v.detach().clone() for k, v in full.trainable.items()}

    seed_everything(0)
    cut = LoraTrainer(base, cs, settings(name="cut", steps=6))
    cut.loop.on_step = lambda step, loss: host.request_cancel() if step == 3 else None
    with pytest.raises(Cancelled):
        cut.run()
    host.clear_cancel()
    again = LoraTrainer(base, cs, settings(name="cut", steps=6, resume="auto"))
    result = again.run()
    assert result.resumed_from == 3
    for k, v in want.items():
        assert torch.allclose(again.trainable[k], v, atol=1e-6), k
    assert result.losses == pytest.approx(full.loop.losses, rel=1e-5)
    # the run's photos trained at their buckets: resuming it centre-cropped is refused, not mixed
    with pytest.raises(UnconfusedError, match="other settings"):
        LoraTrainer(base, cs, settings(name="cut", steps=8, resume="auto", aspect="square")).run()


def test_unknown_aspect_is_refused_with_the_choices():
    for cls in (LoraSettings, E.EMSettings):
        with pytest.raises(UnconfusedError, match=r"aspect.*'portrait' is not one of \['buckets', 'square'\]"):
            cls(aspect="portrait").validated()


def em_settings(**kw) -> E.EMSettings:
    base = dict(name="emb", steps=3, resolution=RES, tokens_only_steps=1, reestimate_every=0, init_timesteps=2,
                reestimate_timesteps=2, estimate_batch=2, checkpoint_every=100, resume="restart", export=False,
                rank=4, alpha=4.0, crf_at="latent")
    base.update(kw)
    return E.EMSettings(**base)


def two_halves(width: int, height: int) -> torch.Tensor:
    """Two different synthetic photos side by side (wide) or stacked (tall)."""
    a, b = synthetic_photos(0, 1, max(width, height))[0], synthetic_photos(1, 1, max(width, height))[0]
    if width >= height:
        return torch.cat([a[:height, : width // 2], b[:height, : width - width // 2]], dim=1)
    return torch.cat([a[: height // 2, :width], b[: height - height // 2, :width]], dim=0)


def test_em_makes_masks_of_the_image_aspect(base):
    """A 2:1 image trains at 128x64: the UNet sees 8x16 latents, every round's masks are 8x16, and
    the returned masks have the image's own 96x192 size (not a square crop of its middle)."""
    scene = E.make_scenes([two_halves(192, 96)], "<a> dog\n<b> cat")
    tr = E.EMTrainer(base, scene, em_settings())
    shapes = []
    real = tr.call_unet
    tr.call_unet = lambda noisy, *a, **k: (shapes.append(tuple(noisy.shape[-2:])), real(noisy, *a, **k))[1]
    result = tr.run()
    assert set(shapes) == {(8, 16)}
    assert all(tuple(r.masks.shape) == (1, 2, 8, 16) for r in result.rounds)
    assert [tuple(m.shape) for m in result.masks] == [(2, 96, 192)]
    assert tr.images[0].shape == (64, 128, 3)


def test_em_with_a_wide_and_a_tall_image(base):
    """Images at different buckets: each keeps its own mask size, batches draw from one bucket, and
    the masks saved with the run resume as they were made."""
    scenes = E.make_scenes([two_halves(192, 96), two_halves(96, 192)], "<a> dog\n<b> cat")
    tr = E.EMTrainer(base, scenes, em_settings(name="emwt", steps=4, batch_size=2, estimate_batch=1))
    shapes = []
    real = tr.call_unet
    tr.call_unet = lambda noisy, *a, **k: (shapes.append(tuple(noisy.shape)), real(noisy, *a, **k))[1]
    result = tr.run()
    masks = result.rounds[-1].masks
    assert isinstance(masks, list) and [tuple(m.shape) for m in masks] == [(2, 8, 16), (2, 16, 8)]
    assert [tuple(m.shape) for m in result.masks] == [(2, 96, 192), (2, 192, 96)]
    train_shapes = {s for s in shapes if s[0] == 2}  # the M steps (batch 2); the E step runs 1 timestep a call
    assert train_shapes <= {(2, 4, 8, 16), (2, 4, 16, 8)} and train_shapes
    again = E.EMTrainer(base, scenes, em_settings(name="emwt", steps=4, batch_size=2, estimate_batch=1, resume="auto"))
    again._load_history(4)
    assert [torch.equal(a, b) for a, b in zip(again.rounds[-1].masks, masks)] == [True, True]


def test_em_concept_masks_flip_with_their_image(base):
    """EM batches at a 2:1 bucket: <a>'s mask (left half) is on the right exactly when the latent is the
    flipped image's, and the loss mask is the union of the sampled concepts' masks."""
    tr = E.EMTrainer(base, E.make_scenes([two_halves(192, 96)], "<a> dog\n<b> cat"), em_settings(batch_size=2))
    left = torch.zeros(8, 16)
    left[:, :8] = 1
    tr.masks = torch.stack([left, 1 - left])[None]  # [1, K, 8, 16]
    flipped = tr.data.latents_flipped[0]
    sides = set()
    for _ in range(6):
        batch = tr.draw_batch(tr.data, 2)
        assert batch.concept_masks.shape == (2, 2, 8, 16)
        for lat, masks, sel, union in zip(batch.latents, batch.concept_masks, batch.select, batch.masks):
            was_flipped = torch.equal(lat, flipped)
            assert was_flipped != torch.equal(lat, tr.data.latents[0])
            a = masks[0]
            assert float(a[:, 8:].min() if was_flipped else a[:, :8].min()) == 1 and float(a.sum()) == 64
            assert torch.equal(union[0], (masks * sel[:, None, None]).amax(0))
            sides.add(was_flipped)
    assert sides == {True, False}


def test_a_mask_made_at_another_size_covers_its_photo():
    """A mask saved at another size than its photo (e.g. 256 px for a 320 px photo) is scaled to the
    photo before the bucket fit, as before buckets, instead of stopping the run."""
    from unconfused.engine.data.training_examples import Example, prepare

    img = torch.rand(320, 320, 3)
    mask = torch.zeros(256, 256)
    mask[:, :128] = 1  # the left half
    data = prepare([Example(img, "a photo of <a>", mask, ["<a>"])], 64, flip=False)
    m = data.masks[0][0]
    assert m.shape == (64, 64) and float(m[:, :30].mean()) > 0.95 and float(m[:, 34:].mean()) < 0.05
