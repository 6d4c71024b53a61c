"""Cross-attention capture: the layers asked for, the fused path elsewhere, maps that mean something."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tiny_models import tiny_bundle
from unconfused.engine.vision.attention import (
    AttentionCapture,
    cross_attention_layers,
    default_layers,
    token_position_mask,
)
from unconfused.engine.models.concept_tokens import add_concept_tokens


def _setup():
    b = tiny_bundle()
    add_concept_tokens(b, [("<a>", "dog"), ("<b>", "cat")])
    return b


def _run(b, prompts, cond=None):
    cond = b.encode_prompt(prompts) if cond is None else cond
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return b.unet(x, torch.tensor([500] * len(prompts)), cond).sample


def test_only_the_chosen_layers_are_captured_and_the_rest_stay_fused(monkeypatch):
    b = _setup()
    layers = default_layers(b.unet)
    every = [n for n in b.unet.attn_processors]
    assert layers and set(layers) < set(cross_attention_layers(b.unet))
    calls = {"sdpa": 0}
    real = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls["sdpa"] += 1
        return real(*a, **k)

    with torch.no_grad():
        cond = b.encode_prompt(["<a> on a sofa"])
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        _run(b, ["<a> on a sofa"], cond)
    assert calls["sdpa"] == len(every)  # all fused without capture
    calls["sdpa"] = 0
    with AttentionCapture(b.unet, layers) as cap, torch.no_grad():
        cap.watch(token_position_mask(b, ["<a> on a sofa"], ["<a>", "<b>"]))
        out = _run(b, ["<a> on a sofa"], cond)
        kinds = {k[: -len(".processor")]: type(v).__name__ for k, v in b.unet.attn_processors.items()}
    assert calls["sdpa"] == len(every) - len(layers)  # captured layers compute probabilities, others fuse
    assert {n for n, k in kinds.items() if k == "_CaptureProcessor"} == set(layers)
    assert all(type(p).__name__ != "_CaptureProcessor" for p in b.unet.attn_processors.values())  # restored
    with torch.no_grad():
        assert torch.allclose(out, _run(b, ["<a> on a sofa"]), atol=1e-5)  # capture does not change the output


def test_maps_are_probability_mass_and_zero_for_absent_tokens():
    b = _setup()
    prompts = ["<a> on a sofa", "<a> and <b>"]
    with AttentionCapture(b.unet) as cap, torch.no_grad():
        cap.watch(token_position_mask(b, prompts, ["<a>", "<b>"]))
        _run(b, prompts)
        maps = cap.maps()
        cap.reset()
        cap.watch(torch.ones(2, 1, 77))  # every position: the probabilities sum to one
        _run(b, prompts)
        whole = cap.maps()
    assert maps.shape[:2] == (2, 2) and maps.min() >= 0 and maps.max() <= 1
    assert maps[0, 1].abs().max() == 0  # <b> is not in the first prompt
    assert maps[1, 1].max() > 0 and maps[0, 0].max() > 0
    assert torch.allclose(whole, torch.ones_like(whole), atol=1e-5)
    norm = AttentionCapture.normalized(maps)
    assert torch.allclose(norm[0, 0].max(), torch.tensor(1.0)) and norm[0, 1].abs().max() == 0


def test_gradients_flow_through_the_capture_to_the_token_rows():
    b = _setup()
    emb = b.text_encoder.get_input_embeddings()
    emb.new_rows.requires_grad_(True)
    with AttentionCapture(b.unet, detach=False) as cap:
        cap.watch(token_position_mask(b, ["<a> on a sofa"], ["<a>"]))
        _run(b, ["<a> on a sofa"])
        target = torch.zeros_like(cap.maps())
        target[..., :4] = 1
        F.mse_loss(cap.maps(), target).backward()
    assert emb.new_rows.grad is not None and emb.new_rows.grad[0].abs().sum() > 0
    assert emb.new_rows.grad[1].abs().sum() == 0  # <b> was not in the prompt
