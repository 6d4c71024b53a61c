"""LoRA trainer: masked loss, exact resume, prior preservation / min-SNR paths, exports."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tiny_models import tiny_bundle
from unconfused.engine import host
from unconfused.engine.models import losses as L
from unconfused.engine.data.concepts import Concept, make_concept_set
from unconfused.engine.errors import Cancelled, UnconfusedError
from unconfused.trainers import lora as T
from unconfused.trainers.lora import LoraSettings, LoraTrainer, train_lora
from unconfused.engine.data.synthetic import synthetic_photos

RES = 64


def concept_set(masked: bool = True):
    half = torch.zeros(96, 96)
    half[:, :48] = 1
    return make_concept_set([
        Concept("<a>", "dog", synthetic_photos(0, 2, 96)),
        Concept("<b>", "cat", synthetic_photos(1, 2, 96), masks=[half, half] if masked else None),
    ])


def settings(**kw) -> LoraSettings:
    base = dict(name="t", steps=4, resolution=RES, checkpoint_every=2, resume="restart", export=False)
    base.update(kw)
    return LoraSettings(**base)


def trainables(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.trainable.items()}


def test_masked_mse_ignores_everything_outside_the_mask():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    loss = L.masked_mse(pred, target, mask).sum()
    loss.backward()
    assert pred.grad[..., 4:].abs().max() == 0
    assert pred.grad[..., :4].abs().min() > 0
    moved = target.clone()
    moved[..., 4:] += 100
    assert torch.allclose(L.masked_mse(pred, moved, mask), L.masked_mse(pred, target, mask))
    inside = ((pred - target) ** 2)[..., :4].mean(dim=(1, 2, 3))
    assert torch.allclose(L.masked_mse(pred, target, mask, "mask_area"), inside)
    assert torch.allclose(L.masked_mse(pred, target, mask, "image_area"), inside / 2)


def test_trainer_applies_the_concept_mask(monkeypatch):
    """Changing the target outside the mask (the right half) leaves the trainer's loss and
    gradients unchanged; changing it inside does not."""
    cs = make_concept_set([Concept("<b>", "cat", synthetic_photos(1, 2, 96),
                                   masks=[torch.cat([torch.ones(96, 48), torch.zeros(96, 48)], 1)] * 2)])
    tr = LoraTrainer(tiny_bundle(), cs, settings(flip=False))
    real_target = L.diffusion_target

    def run(where: str | None):
        tr.generator.manual_seed(7)
        with host.training_mode():
            batch = tr.draw_batch(tr.data, 2)
            masks = batch.masks
            assert masks is not None and masks[..., :3].min() == 1 and masks[..., 5:].max() == 0

            def target(*a, **k):
                t = real_target(*a, **k)
                if where is not None:
                    region = (masks == 0) if where == "outside" else (masks == 1)
                    t = t + 50.0 * region.expand_as(t)
                return t

            monkeypatch.setattr(L, "diffusion_target", target)
            loss = tr.batch_loss(batch, 1.0)
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in tr.trainable.values() if p.grad is not None])
        tr.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    base_loss, base_grads = run(None)
    out_loss, out_grads = run("outside")
    in_loss, _ = run("inside")
    assert out_loss == pytest.approx(base_loss, rel=1e-6)
    assert torch.allclose(out_grads, base_grads, atol=1e-7)
    assert in_loss > base_loss * 10


def test_resume_equals_uninterrupted_run(tmp_path):
    cs = concept_set()
    full = LoraTrainer(tiny_bundle(), cs, settings(name="full", steps=6, checkpoint_every=3))
    full.run()
    want = trainables(full)

    cut = LoraTrainer(tiny_bundle(), cs, settings(name="cut", steps=6, checkpoint_every=100))
    cut.loop.on_step = lambda step, loss: host.request_cancel() if step == 3 else None
    with pytest.raises(Cancelled):
        cut.run()
    host.clear_cancel()
    assert [p.name for p in cut.loop.checkpoints()] == ["step_000003.pt"]  # written on Cancel
    assert not (host.model_folders("loras")[0] / "cut.safetensors").exists()

    again = LoraTrainer(tiny_bundle(), cs, settings(name="cut", steps=6, checkpoint_every=100, resume="auto"))
    result = again.run()
    assert result.resumed_from == 3
    got = trainables(again)
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    assert result.losses == pytest.approx(full.loop.losses, rel=1e-5)
    # and the weights really moved: a broken resume cannot pass by training nothing
    fresh = LoraTrainer(tiny_bundle(), cs, settings(name="fresh", steps=1))
    assert any(not torch.allclose(fresh.trainable[k], want[k]) for k in want)


def test_resume_refuses_other_settings():
    cs = concept_set()
    LoraTrainer(tiny_bundle(), cs, settings(name="r", steps=2)).run()
    other = LoraTrainer(tiny_bundle(), cs, settings(name="r", steps=2, rank=4, resume="auto"))
    with pytest.raises(UnconfusedError, match=r"\[UnconfusedTrainLoRA\] input 'run_name'.*other settings"):
        other.run()


def test_training_moves_tokens_and_lora_but_not_the_input_bundle():
    bundle = tiny_bundle()
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    emb_before = bundle.text_encoder.get_input_embeddings().weight.detach().clone()
    result = train_lora(bundle, concept_set(), settings(steps=3, unet_lr=1e-3, token_lr=1e-2))
    # the input is untouched (ComfyUI reuses upstream outputs)
    assert bundle.added_tokens == {} and not getattr(bundle.unet, "peft_config", None)
    for k, v in bundle.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    trained = result.bundle
    emb = trained.text_encoder.get_input_embeddings()
    assert torch.equal(emb.base.weight, emb_before)  # the vocabulary's rows never train
    from unconfused.engine.models.concept_tokens import token_rows

    dog = emb_before[trained.tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(token_rows(trained, "<a>")[0], dog)  # initialised from "dog", then trained
    lora_b = [p for n, p in trained.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)


def test_prior_preservation_min_snr_and_noise_offset_paths():
    bundle = tiny_bundle(prediction_type="v_prediction")
    s = settings(steps=2, prior_preservation=True, class_images=2, validation_steps=2, min_snr_gamma=5.0,
                 noise_offset=0.1)
    tr = LoraTrainer(bundle, concept_set(), s)
    assert tr.prior is not None and len(tr.prior) == 4  # 2 images x (dog, cat)
    cached = sorted((host.output_dir() / "unconfused" / "class_images").rglob("*.png"))
    assert len(cached) == 4
    stamps = [p.stat().st_mtime_ns for p in cached]
    result = tr.run()
    assert all(l == l for l in result.losses)
    # a second trainer reuses the cached class images
    LoraTrainer(tiny_bundle(prediction_type="v_prediction"), concept_set(), s)
    assert [p.stat().st_mtime_ns for p in cached] == stamps

    # the prior term and the SNR weights change the loss
    def first_loss(**kw):
        t = LoraTrainer(tiny_bundle(prediction_type="v_prediction"), concept_set(), settings(
            steps=1, prior_preservation=True, class_images=2, validation_steps=2, **kw))
        t.generator.manual_seed(3)
        with host.training_mode():
            return t.step(0)

    assert first_loss(prior_weight=1.0) != pytest.approx(first_loss(prior_weight=0.0))
    assert first_loss(min_snr_gamma=1.0) != pytest.approx(first_loss(min_snr_gamma=0.0))


def test_uncached_latents_and_gradient_accumulation_train():
    result = train_lora(tiny_bundle(), concept_set(), settings(steps=2, cache_latents=False, batch_size=2,
                                                               gradient_accumulation=2, gradient_checkpointing=True))
    assert len(result.losses) == 2 and all(l == l for l in result.losses)


def test_exports_are_kohya_lora_and_clip_l_embeddings():
    s = settings(name="pets", steps=2, export=True, rank=4, alpha=2.0, validation_prompts=["<a> with <b>"],
                 validation_steps=2)
    result = train_lora(tiny_bundle(), concept_set(), s)
    lora = load_file(result.exports["lora"])
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    downs = [k for k in lora if k.endswith(".lora_down.weight")]
    assert downs and all(k.replace(".lora_down.weight", ".lora_up.weight") in lora for k in downs)
    assert all(float(lora[k.replace(".lora_down.weight", ".alpha")]) == 2.0 for k in downs)
    assert all(lora[k].shape[0] == 4 for k in downs)
    assert any("_attn1_to_q" in k for k in downs) and any("_attn2_to_out_0" in k for k in downs)
    with safe_open(result.exports["lora"], "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_tokens"]) == ["<a>", "<b>"] and meta["ss_network_dim"] == "4"
    assert "/" not in "".join(meta.values())  # no paths in the header
    emb = load_file(result.exports["embedding:<a>"])
    assert set(emb) == {"clip_l"} and emb["clip_l"].shape == (1, 32)
    assert result.exports["embedding:<b>"].name == "pets_b.safetensors"
    assert "embedding:pets_a" in result.info()
    assert result.validation is not None and result.validation.shape == (1, RES, RES, 3)
    assert (result.run_dir / "loss.png").is_file() and (result.run_dir / "validation" / "step_000002.png").is_file()


@pytest.mark.parametrize("field,value,message", [
    ("resolution", 100, "multiple of 64"),
    ("steps", 0, "at least 1"),
    ("optimizer", "sgd", "not one of"),
    ("template", "a photo", "must contain {token}"),
    ("name", "..", "not usable as a file name"),
])
def test_bad_settings_name_the_input(field, value, message):
    with pytest.raises(UnconfusedError, match=rf"\[UnconfusedTrainLoRA\] input '{field}'.*{message}"), \
            host.running_node(name="UnconfusedTrainLoRA"):  # as the node validates them
        LoraSettings(**{field: value}).validated()


def test_unknown_config_keys_are_refused():
    with pytest.raises(UnconfusedError, match="unknown settings.*'stepz'"):
        LoraSettings.from_dict({"stepz": 3})


def test_adamw8bit_without_bitsandbytes_says_what_to_do(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("no")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UnconfusedError, match="input 'optimizer'.*bitsandbytes"):
        T._optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}], "adamw8bit")


def test_node_trains_under_comfyui_inference_mode():
    """ComfyUI runs every node under torch.inference_mode() and its loader made the weights there."""
    from unconfused import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["UnconfusedTrainLoRA"]()
    with torch.inference_mode():
        bundle = tiny_bundle()
        assert next(bundle.unet.parameters()).is_inference()
        out = node.train(bundle, concept_set(), name="node", steps=2, resolution=RES, rank=4, alpha=4.0,
                         unet_lr=1e-4, token_lr=2e-4, masked_loss=True, seed=0, resume="restart",
                         validation_prompts="<a> and <b>\n<b> alone", validation_steps=2)
    model, validation, curve, info = out["result"]
    assert model.added_tokens.keys() == {"<a>", "<b>"} and validation.shape == (2, RES, RES, 3)
    assert curve.ndim == 4 and "embedding:node_a" in info
    assert len(out["ui"]["images"]) == 3  # two validation images + the loss curve
    assert (host.model_folders("loras")[0] / "node.safetensors").is_file()


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "output-is-a-file"
    blocker.write_text("not a folder")
    host.configure(output_dir=blocker)
    with pytest.raises(UnconfusedError, match=r"input 'name'.*writable"):
        LoraTrainer(tiny_bundle(), concept_set(), settings(name="ro"))


def test_disk_full_during_export_loses_nothing_and_a_rerun_finishes(monkeypatch):
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    s = settings(name="full-disk", steps=2, export=True)
    with pytest.raises(UnconfusedError, match="No space left on device.*disk is not full"):
        train_lora(tiny_bundle(), concept_set(), s)
    loras = host.model_folders("loras")[0]
    assert loras.is_dir() and not list(loras.iterdir())  # no half-written file, no temp file
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    again = train_lora(tiny_bundle(), concept_set(), settings(name="full-disk", steps=2, export=True, resume="auto"))
    assert again.resumed_from == 2 and again.exports["lora"].is_file()  # the trained steps were kept
