"""The model-family seam (engine/models/families.py): the family object owns text encoding, the UNet call,
the text encoders that take token rows and LoRA, export keys, attention layers and resolution; the
trainers, the sampler and the exports ask it. A second text encoder (SDXL's shape) is proven with a
test family registered here - adding one is one new class."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import tiny_bundle
from unconfused.engine.models import families as Fm
from unconfused.engine.vision.attention import default_layers
from unconfused.engine.models.exports import kohya_lora_state, save_embedding
from unconfused.engine.models.loading import add_text_encoder_lora, bundle_from_parts
from unconfused.engine.models.concept_tokens import add_concept_tokens, concept_embedding, token_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def test_each_bundle_has_its_family_object(bundle):
    assert bundle.family == "sd1" and bundle.spec is Fm.FAMILIES["sd1"] and Fm.family_of(bundle).name == "sd1"
    b2 = bundle_from_parts(bundle.unet, bundle.vae, bundle.text_encoder, family="sd2", prediction_type="v_prediction")
    assert b2.spec.name == "sd2" and b2.spec.embedding_key() == "clip_h"
    assert b2.spec.default_resolution(b2) == 768 and bundle.spec.default_resolution(bundle) == 512
    with pytest.raises(ValueError, match="unknown model family 'sd9'"):
        Fm.family_named("sd9")


def test_the_family_encodes_and_calls_the_unet_as_the_models_do(bundle):
    fam = bundle.spec
    with torch.no_grad():
        cond = fam.encode(bundle, ["a photo of a dog", "a cat"])
        ids = bundle.tokenizer(["a photo of a dog", "a cat"], padding="max_length",
                               max_length=bundle.tokenizer.model_max_length, return_tensors="pt").input_ids
        assert torch.equal(cond.hidden, bundle.text_encoder(ids)[0])
        assert torch.equal(bundle.encode_prompt(["a cat"]), cond.hidden[1:])
        x = torch.randn(2, 4, 8, 8)
        t = torch.tensor([10, 500])
        assert torch.equal(fam.call_unet(bundle.unet, x, t, cond), bundle.unet(x, t, cond.hidden).sample)
    rows = cond.rows()
    assert len(rows) == 2 and torch.equal(Fm.Conditioning.cat(rows[::-1]).hidden, cond.hidden.flip(0))
    assert fam.attention_layers(bundle.unet) == default_layers(bundle.unet)


def test_embedding_and_lora_keys_come_from_the_family(bundle, tmp_path):
    from peft import LoraConfig

    b = bundle.clone()
    add_concept_tokens(b, [("<a>", "dog")])
    path = save_embedding(tmp_path / "e.safetensors", b.spec.embedding_state(b, "<a>"), "sd1", metadata={})
    assert set(load_file(path)) == {"clip_l"}
    b2 = bundle_from_parts(b.unet, b.vae, b.text_encoder, family="sd2", tokenizer=b.tokenizer)
    b2.added_tokens = dict(b.added_tokens)
    assert set(load_file(save_embedding(tmp_path / "h.safetensors", token_rows(b2, "<a>"), "sd2",
                                        metadata={}))) == {"clip_h"}
    add_text_encoder_lora(b.text_encoder, LoraConfig(r=2, target_modules=["q_proj"]))
    keys = kohya_lora_state(None, b.text_encoder, 2.0)
    assert keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)


class TwoEncoders(Fm.Family):
    """SDXL's text side: two encoders, each with its own embedding key and kohya LoRA prefix."""

    name = "two-encoders"
    text_encoders = {"text_encoder": ("clip_l", "lora_te1_"), "text_encoder_2": ("clip_g", "lora_te2_")}


def test_a_family_with_two_text_encoders_gets_rows_and_exports_in_both(bundle, tmp_path, monkeypatch):
    from peft import LoraConfig

    monkeypatch.setitem(Fm.FAMILIES, TwoEncoders.name, TwoEncoders())
    b = bundle.clone()
    b.family = TwoEncoders.name
    b.text_encoder_2 = copy.deepcopy(b.text_encoder)
    with torch.no_grad():  # a different second encoder: its class-word rows differ from the first's
        concept_embedding(b.text_encoder_2).base.weight.mul_(2)
    add_concept_tokens(b, [("<a>", "dog")])
    state = b.spec.embedding_state(b, "<a>")
    assert set(state) == {"clip_l", "clip_g"} and torch.allclose(state["clip_g"], 2 * state["clip_l"])
    b.to("cpu", torch.bfloat16)  # both encoders are moved; their new rows stay fp32
    assert all(concept_embedding(te).new_rows.dtype == torch.float32 for te in b.spec.encoders(b).values())
    assert all(p.dtype == torch.bfloat16 for n, p in b.text_encoder_2.named_parameters() if "fc1" in n)
    for te in b.spec.encoders(b).values():
        add_text_encoder_lora(te, LoraConfig(r=2, target_modules=["q_proj"]))
    keys = kohya_lora_state(None, b.spec.encoders(b), 2.0, family=TwoEncoders.name)
    prefixes = {k.split("text_model")[0] for k in keys}
    assert prefixes == {"lora_te1_", "lora_te2_"}


def test_trainers_sampler_and_em_call_models_only_through_the_family():
    """No direct `unet(noisy, t, cond)` or `text_encoder(ids)` outside engine/models/families.py."""
    direct = re.compile(r"(?<!\w)(unet|text_encoder|text_encoder_2|te)\(")
    files = (sorted((REPO / "trainers").glob("*.py")) + sorted((REPO / "app").glob("*.py"))
             + [REPO / "engine" / "models" / n for n in ("sampling.py", "exports.py", "loading.py")])
    assert all(f.is_file() for f in files), [f for f in files if not f.is_file()]
    offenders = []
    for f in files:
        if f.name == "smoke.py":  # the bare-models smoke test: it checks the raw diffusers models themselves
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if direct.search(code):
                offenders.append(f"{f.name}:{i}: {line.strip()}")
    assert not offenders, offenders
