"""Mixed precision in every trainer, proven on the CPU (torch autocasts bf16 and fp16 there, and
`torch.amp.GradScaler("cpu")` scales like the CUDA one).

The rules (trainers/base.py, docs/trainer-core.md): frozen weights in the half precision; every
trained tensor - token rows, LoRA, full text-encoder weights - and its optimizer state in fp32;
fp16 with a gradient scaler whose state is checkpointed.
"""

from __future__ import annotations

import functools

import pytest
import torch

from test_clif import tiny_tower_model, write_dataset
from tiny_models import tiny_bundle
from unconfused.engine import host
from unconfused.engine.vision.clip_zero_shot import ClipScorer
from unconfused.engine.data.concepts import Concept, make_concept_set
from unconfused.engine.errors import Cancelled
from unconfused.engine.models.concept_tokens import concept_embedding
from unconfused.trainers import base as B
from unconfused.trainers import em as E
from unconfused.trainers.clif import ClifSettings, ClifTrainer
from unconfused.trainers.lora import LoraSettings, LoraTrainer
from unconfused.trainers.loop import seed_everything
from unconfused.engine.data.synthetic import synthetic_photos

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS = ("<red>", "<blue>")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    return tiny_bundle()


@pytest.fixture(scope="module")
def clif_data(tmp_path_factory):
    model, name = tiny_tower_model()
    return write_dataset(tmp_path_factory.mktemp("prec") / "ds", per_concept=6, mix=2), ClipScorer(model, name,
                                                                                                   name="tiny-clip")


@pytest.fixture
def calm_scaler(monkeypatch):
    """fp16's scaler starts at 2^16 and halves on each overflowing step, skipping it (CLIF's tiny
    model overflows for its first 3 steps; test_clif_trains_fp32_tensors_in_every_mode sees that).
    Tests that compare runs step by step start it at 2^8, where no step overflows."""
    monkeypatch.setattr(B.torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 8))


def concept_set():
    return make_concept_set([Concept("<a>", "dog", synthetic_photos(0, 2, 64)),
                             Concept("<b>", "cat", synthetic_photos(1, 2, 64))])


def lora(bundle, precision: str, **kw) -> LoraTrainer:
    s = dict(name=f"lora-{precision}", steps=3, resolution=64, rank=4, alpha=4.0, checkpoint_every=100,
             resume="restart", export=False, device="cpu", precision=precision, flip=False)
    s.update(kw)
    seed_everything(0)  # the LoRA's random init
    return LoraTrainer(bundle, concept_set(), LoraSettings(**s))


def clif(bundle, data, precision: str, train: str = "tokens", **kw) -> ClifTrainer:
    dataset, scorer = data
    s = dict(name=f"clif-{train}-{precision}", train=train, steps=3, batch_size=4, warmup_steps=0, holdout=0.0,
             checkpoint_every=100, resume="restart", export=False, device="cpu", precision=precision, rank=4,
             alpha=4.0)
    s.update(kw)
    seed_everything(0)
    return ClifTrainer(bundle, dataset, scorer, ClifSettings(**s))


def em(bundle, precision: str, **kw) -> E.EMTrainer:
    img = torch.cat([synthetic_photos(0, 1, 64)[0][:, :32], synthetic_photos(1, 1, 64)[0][:, 32:]], dim=1)
    scenes = E.make_scenes([img], "<a> dog\n<b> cat")
    s = dict(name=f"em-{precision}", steps=3, resolution=64, rank=4, alpha=4.0, tokens_only_steps=1,
             reestimate_every=0, init_timesteps=2, estimate_batch=2, crf_at="off", checkpoint_every=100,
             resume="restart", export=False, device="cpu", precision=precision, flip=False)
    s.update(kw)
    return E.EMTrainer(bundle, scenes, E.EMSettings(**s))


def rows(trainer) -> torch.Tensor:
    return concept_embedding(trainer.bundle.text_encoder).new_rows.detach().clone()


def steps(trainer, n: int) -> None:
    with host.training_mode():
        for i in range(n):
            trainer.step(i)


def assert_fp32_training(trainer, half: torch.dtype) -> None:
    assert trainer.trainable
    for name, p in trainer.trainable.items():
        assert p.dtype == torch.float32, name
    states = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    assert states and all(v.dtype == torch.float32 for v in states)
    # ...while the frozen weights run in the half precision
    frozen = [p for n, p in trainer.bundle.unet.named_parameters() if not p.requires_grad and "lora_" not in n]
    assert frozen and all(p.dtype == half for p in frozen)


# ---------------------------------------------------------------- every trainer: fp32 where it trains
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lora_trains_fp32_tensors_over_half_weights(base, precision):
    tr = lora(base, precision)
    before = rows(tr)
    steps(tr, 2)
    assert_fp32_training(tr, HALF[precision])
    assert not torch.equal(rows(tr), before)
    assert tr.precision.scaler.is_enabled() == (precision == "fp16")


@pytest.mark.parametrize("train", ["tokens", "tokens+lora", "tokens+full"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_clif_trains_fp32_tensors_in_every_mode(base, clif_data, precision, train):
    """The CLIF bug: `_move(te, dev, bf16)` cast the new token rows to half, and the upcast only
    touched what already required grad - the rows were switched on afterwards, in half."""
    tr = clif(base, clif_data, precision, train)
    before = rows(tr)
    with host.training_mode():
        for i in range(8):  # fp16: the scaler skips the steps whose gradients overflow, halving its scale
            tr.step(i)
            if tr.optimizer.state:
                break
    if precision == "fp16":
        assert tr.precision.scaler.get_scale() < 65536.0
    assert concept_embedding(tr.bundle.text_encoder).new_rows.dtype == torch.float32
    for name, p in tr.trainable.items():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
    states = [v for st in tr.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    assert states and all(v.dtype == torch.float32 for v in states)
    te_frozen = [p for n, p in tr.bundle.text_encoder.named_parameters() if not p.requires_grad and "lora_" not in n]
    want = torch.float32 if train == "tokens+full" else HALF[precision]  # full: all of it trains
    assert te_frozen and all(p.dtype == want for p in te_frozen)
    assert not torch.equal(rows(tr), before)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mask_em_trains_fp32_tensors_over_half_weights(base, precision):
    tr = em(base, precision)
    before = rows(tr)
    res = tr.run()  # the estimate (E step) runs the half-precision UNet under the attention capture too
    assert res.rounds and torch.isfinite(res.rounds[-1].masks).all()
    assert all(p.dtype == torch.float32 for p in tr.trainable.values())
    states = [v for st in tr.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    assert states and all(v.dtype == torch.float32 for v in states)
    assert not torch.equal(rows(tr), before)


# ---------------------------------------------------------------- the rows learn what fp32 learns
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("which", ["lora", "clif"])
def test_token_rows_follow_the_fp32_run(base, clif_data, calm_scaler, precision, which):
    """Three steps at the default rates: the rows' update in half precision points where the fp32
    run's does (cosine > 0.9) and has its size (within 20%). Why these bounds: Adam's update is
    about lr x sign(gradient) per element in its first steps, so it is set by the gradient's
    direction, which half-precision compute perturbs by its rounding (bf16: 2^-8 relative per
    operation, fp16: 2^-11) - elements whose gradient is near zero may flip, the bulk may not.
    Rows kept in half precision fail both: their update rounds to 0 or to whole bf16 steps."""
    make = (lambda p: lora(base, p, name=f"f-{which}-{p}")) if which == "lora" else \
        (lambda p: clif(base, clif_data, p, name=f"f-{which}-{p}"))
    ref, half = make("fp32"), make(precision)
    start = rows(ref)
    assert torch.equal(rows(half), start)  # same initial rows (the class word's embedding)
    steps(ref, 3)
    steps(half, 3)
    d_ref, d_half = (rows(ref) - start).flatten(), (rows(half) - start).flatten()
    assert d_ref.norm() > 0 and d_half.norm() > 0
    cos = float(torch.nn.functional.cosine_similarity(d_ref, d_half, dim=0))
    assert cos > 0.9, cos
    assert 0.8 < float(d_half.norm() / d_ref.norm()) < 1.25


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_an_update_of_the_default_learning_rate_is_not_rounded_away(base, clif_data, calm_scaler, precision):
    """One Adam step moves each element by about lr (1e-4 for CLIF's rows): below bf16's
    resolution for rows of size ~0.01-1 (2^-8 relative), so rows stored in bf16 would not move or
    would move by whole bf16 steps. Kept in fp32 they move by lr."""
    tr = clif(base, clif_data, precision, "tokens+lora", max_grad_norm=0.0)
    lr = tr.settings.token_lr
    assert lr == ClifSettings().token_lr == 1e-4
    before = rows(tr)
    steps(tr, 1)
    delta = (rows(tr) - before).abs().flatten()
    moved = delta[delta > 0]
    assert moved.numel() > 0.9 * delta.numel()
    assert float(moved.median()) == pytest.approx(lr, rel=0.1)
    # the same update on rows stored in bf16 (this model's rows are ~0.02, where bf16's step is
    # 6e-5..2.4e-4): rounded to 0 or to whole bf16 steps - on average far from the update made
    step = rows(tr) - before
    in_bf16 = (before.bfloat16() + step.bfloat16()).float() - before.bfloat16().float()
    err = ((in_bf16 - step).abs() / step.abs().clamp(min=1e-12))[step != 0]
    assert float(err.mean()) > 0.2, float(err.mean())


def test_fp16_scaler_keeps_tiny_gradients(base):
    """Gradients of a loss scaled by 1e-7 underflow to zero in fp16 backward; the scaler multiplies
    the loss by 65536 first, so the LoRA (whose B matrices start at zero) still moves."""
    def lora_b(tr):
        return torch.cat([p.detach().flatten() for n, p in tr.trainable.items() if "lora_B" in n])

    def run(scaled: bool):
        tr = lora(base, "fp16", name=f"tiny-{scaled}", train_tokens=False, max_grad_norm=0.0)
        if not scaled:
            tr.precision.scaler = torch.amp.GradScaler("cpu", enabled=False)
        real = tr.micro_batch_loss
        tr.micro_batch_loss = lambda step, micro: real(step, micro) * 1e-7
        assert lora_b(tr).abs().max() == 0
        steps(tr, 1)
        return lora_b(tr)

    assert run(scaled=True).abs().max() > 0
    assert run(scaled=False).abs().max() == 0  # every gradient underflowed: Adam had nothing to follow


def test_half_precision_resume_equals_uninterrupted(base, monkeypatch):
    """fp16 with a scaler that grows every step (so its state matters): a run cancelled after 2 of
    4 steps and resumed ends with the uninterrupted run's weights, losses and scale."""
    monkeypatch.setattr(B.torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=1))
    full = lora(base, "fp16", name="p-full", steps=4)
    full.run()
    cut = lora(base, "fp16", name="p-cut", steps=4)
    cut.loop.on_step = lambda step, loss: host.request_cancel() if step == 2 else None
    with pytest.raises(Cancelled):
        cut.run()
    host.clear_cancel()
    again = lora(base, "fp16", name="p-cut", steps=4, resume="auto")
    assert again.precision.scaler.get_scale() == 65536.0  # fresh, before the resume
    res = again.run()
    assert res.resumed_from == 2
    assert again.precision.scaler.get_scale() == full.precision.scaler.get_scale() != 65536.0
    for k, p in full.trainable.items():
        assert torch.equal(again.trainable[k], p), k
    assert res.losses == pytest.approx(full.loop.losses, rel=1e-6)
