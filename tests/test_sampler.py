"""The multi-concept sampler: determinism, batches, LoRA strength, prompt checks, attention maps."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_bundle
from unconfused.engine import host
from unconfused.engine.models import sampling as S
from unconfused.engine.errors import UnconfusedError
from unconfused.engine.models.concept_tokens import add_concept_tokens

KW = dict(negative="", steps=3, width=64, height=64)


@pytest.fixture
def bundle():
    b = tiny_bundle()
    add_concept_tokens(b, [("<a>", "dog"), ("<b>", "cat")])
    return b


@pytest.mark.parametrize("scheduler", ["ddpm", "euler"])  # both draw noise during sampling
def test_same_seed_same_image_and_batch_equals_singles(bundle, scheduler):
    one = S.sample(bundle, "<a> and <b>", seed=5, scheduler=scheduler, **KW)
    again = S.sample(bundle, "<a> and <b>", seed=5, scheduler=scheduler, **KW)
    assert torch.equal(one.images, again.images)
    batch = S.sample(bundle, "<a> and <b>", seed=4, batch_size=3, scheduler=scheduler, **KW)
    assert batch.images.shape == (3, 64, 64, 3)
    assert torch.allclose(batch.images[1], one.images[0], atol=1e-4)  # seed 4 + 1
    other = S.sample(bundle, "<a> and <b>", seed=6, scheduler=scheduler, **KW)
    assert not torch.allclose(other.images, one.images, atol=1e-3)


def test_unknown_token_and_too_long_prompt(bundle):
    with pytest.raises(UnconfusedError, match=r"\[N\] input 'prompt'.*<carol>.*knows: <a>, <b>"):
        with host.running_node(name="N"):
            S.sample(bundle, "<a> and <carol>", **KW)
    long = "<a> " + " ".join(["tree"] * 90) + " ending words"
    r = S.sample(bundle, long, **KW)
    assert any("was cut" in w and "ending words" in w for w in r.warnings)


def test_attention_maps_per_token_and_empty_when_absent(bundle):
    r = S.sample(bundle, "a photo of <a> on grass", debug_attention=True, seed=1, **KW)
    assert r.tokens == ["<a>", "<b>"] and r.maps.shape == (1, 2, 64, 64)
    assert float(r.maps[0, 0].max()) == pytest.approx(1.0)  # normalised by its maximum
    assert float(r.maps[0, 1].abs().max()) == 0.0  # <b> is not in the prompt
    plain = S.sample(bundle, "a photo of <a> on grass", seed=1, **KW)
    assert torch.allclose(plain.images, r.images, atol=1e-5)  # the debugger does not change the picture
    assert r.overlay().size[0] >= 64


def test_lora_strength_scales_the_adapter_and_is_restored(bundle):
    from peft import LoraConfig

    bundle.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in bundle.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    full = S.sample(bundle, "<a>", seed=2, **KW)
    off = S.sample(bundle, "<a>", seed=2, lora_strength=0.0, **KW)
    bundle.unet.disable_adapters()
    base = S.sample(bundle, "<a>", seed=2, **KW)
    bundle.unet.enable_adapters()
    assert torch.allclose(off.images, base.images, atol=1e-5)
    assert not torch.allclose(full.images, base.images, atol=1e-3)
    assert torch.allclose(S.sample(bundle, "<a>", seed=2, **KW).images, full.images, atol=1e-6)  # restored


def test_node_outputs_latent_masks_and_preview(bundle):
    from unconfused import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["UnconfusedSample"]()
    with torch.inference_mode():
        out = node.sample(bundle, "<a> with <b>", "", "ddim", 2, 7.5, 64, 64, 0, 2, 1.0, True)
    images, latent, masks, preview, info = out["result"]
    assert images.shape == (2, 64, 64, 3) and latent["samples"].shape == (2, 4, 8, 8)
    assert masks.shape == (4, 64, 64)  # 2 images x 2 tokens
    assert "in order <a>, <b>" in info and len(out["ui"]["images"]) == 3
