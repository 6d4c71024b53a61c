"""The native hand-off's pure parts (engine/models/handoff.py) and the nodes' refusals, without ComfyUI:
family and prediction type from ComfyUI's class names, weights shared instead of copied, the
concept tokens spelled for ComfyUI's tokenizer, the LoRA in LoraLoader's naming, the text
encoder's changed weights. Against real ComfyUI: tests/test_handoff_comfy.py."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from tiny_models import tiny_bundle, tiny_sdxl_bundle
from unconfused.engine.models import handoff as H
from unconfused.engine.errors import UnconfusedError
from unconfused.engine.models.loading import add_text_encoder_lora, hf_text_keys
from unconfused.engine.models.concept_tokens import add_concept_tokens
from unconfused.nodes.handoff import UnconfusedApplyToComfy, UnconfusedBundleFromComfy


# ---------------------------------------------------------------- stand-ins for ComfyUI's MODEL (duck-typed)
def _fake_model(config_class: str, sampling: tuple[str, ...] = ("EPS",)):
    def cls(name, bases=(object,)):
        return type(name, bases, {})

    sampling_cls = cls("ModelSamplingDiscrete", tuple(cls(n) for n in sampling))
    base = type("BaseModel", (), {})()
    base.model_config = cls(config_class)()
    base.model_sampling = sampling_cls()
    base.diffusion_model = None
    model = type("ModelPatcher", (), {})()
    model.model, model.object_patches, model.patches = base, {}, {}
    return model


@pytest.mark.parametrize("config,words", [("SDXLRefiner", "SDXL refiner"), ("SSD1B", "SSD-1B"),
                                          ("KOALA_700M", "KOALA"), ("Flux", "Flux"), ("SD3", "SD3"),
                                          ("SVD_img2vid", "video"), ("WAN21_T2V", "video"),
                                          ("SomeNewModel", "'SomeNewModel'")])
def test_unsupported_families_are_named(config, words):
    for node in (UnconfusedBundleFromComfy(), ):
        with pytest.raises(UnconfusedError) as e:
            node.build(_fake_model(config), None, None)
        msg = str(e.value)
        assert words in msg and "SD 1.x, SD 2.x and SDXL" in msg and "Bundle" in msg.replace("UnconfusedBundleFromComfy",
                                                                                      "Bundle"), msg
    with pytest.raises(UnconfusedError, match=words.strip("'")):
        UnconfusedApplyToComfy().apply(_fake_model(config), None, tiny_bundle(), 1.0, 1.0)


def test_prediction_type_comes_from_the_model_sampling():
    assert H.family_of("SD15") == "sd1" and H.family_of("SD20") == "sd2" and H.family_of("SDXL") == "sdxl"
    assert H.prediction_of(["ModelSamplingDiscrete", "EPS", "object"]) == "epsilon"
    # V_PREDICTION subclasses EPS in ComfyUI: the more specific one wins
    assert H.prediction_of(["ModelSamplingAdvanced", "ModelSamplingDiscrete", "V_PREDICTION", "EPS"]) == "v_prediction"
    with pytest.raises(UnconfusedError, match="EDM"):
        H.prediction_of(["ModelSamplingAdvanced", "EDM", "V_PREDICTION", "EPS"])
    with pytest.raises(UnconfusedError, match="prediction type"):
        H.prediction_of(["Something", "object"])


def test_inference_tensors_are_shared_not_copied_and_train():
    with torch.inference_mode():  # how ComfyUI makes its weights
        w = torch.randn(8, 4)
    shared = H.shared_tensor(w)
    assert not shared.is_inference() and shared.data_ptr() == w.data_ptr() and torch.equal(shared, w)
    assert H.same_storage(shared, w)
    x = torch.randn(3, 8, requires_grad=True)
    (x @ torch.nn.Parameter(shared, requires_grad=False)).sum().backward()  # autograd saves it for backward
    assert x.grad is not None
    normal = torch.randn(2)
    assert H.shared_tensor(normal) is normal
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside inference mode"):
        H.shared_tensor(w)


def test_concept_tokens_become_embedding_words_comfyui_reads():
    names = {t: H.embedding_name(t) for t in ("<a>", "<a-b>", "<my dog>", "[x]")}
    for t, n in names.items():
        assert n.startswith("unconfused.") and not any(c in n for c in "<>[] ,"), (t, n)
    assert len(set(names.values())) == len(names)
    rewrite = H.prompt_rewriter(["<a>", "<a-b>"])
    out = rewrite("(<a-b>:1.2) with <a>, and x<a>y")
    assert out.split() == ["(", "embedding:unconfused.a-b", ":1.2)", "with", "embedding:unconfused.a", ",", "and",
                           "x", "embedding:unconfused.a", "y"], out
    assert H.prompt_rewriter([])("<a> stays") == "<a> stays"


def test_handback_lora_tokens_and_text_encoder_changes():
    b = tiny_bundle()
    assert H.handback(b).empty
    add_concept_tokens(b, [("<a>", "dog")], vectors=2)
    b.unet.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=["to_q", "to_v"]))
    add_text_encoder_lora(b.text_encoder, LoraConfig(r=2, lora_alpha=8.0, target_modules=["q_proj"]))
    back = H.handback(b)
    assert set(back.embeddings) == {"unconfused.a"} and set(back.embeddings["unconfused.a"]) == {"clip_l"}
    assert back.embeddings["unconfused.a"]["clip_l"].shape[0] == 2
    alphas = {k.split("_", 2)[1]: float(v) for k, v in back.lora.items() if k.endswith(".alpha")}
    assert alphas == {"unet": 2.0, "te": 8.0}  # each adapter's own alpha (LoraLoader's scale = alpha / rank)
    mods = H.lora_modules(back.lora)
    assert any(m.startswith("lora_unet_") and m.endswith("_to_q") for m in mods)
    assert any(m.startswith("lora_te_text_model_encoder_layers_") for m in mods)

    # text-encoder weights: ComfyUI's CLIP keys are `<prefix>text_model.<...>`
    te_state = b.text_encoder.state_dict()
    comfy_state = {"clip_l.transformer." + k.replace(".base_layer.", "."): v for k, v in hf_text_keys(te_state).items()
                   if "lora_" not in k}
    assert H.text_encoder_deltas(te_state, comfy_state) == {}  # same tensors: nothing to send
    comfy_state = {k: v.clone() for k, v in comfy_state.items()}
    assert H.text_encoder_deltas(te_state, comfy_state) == {}  # equal values: nothing either
    key = next(k for k in comfy_state if k.endswith("layers.0.self_attn.q_proj.weight"))
    comfy_state[key] = comfy_state[key] - 0.5  # our trained weight is 0.5 above ComfyUI's
    deltas = H.text_encoder_deltas(te_state, comfy_state)
    assert list(deltas) == [key] and torch.allclose(deltas[key], torch.full_like(deltas[key], 0.5))


def test_sdxl_handback_covers_both_text_encoders():
    """SDXL: the concept rows go out for CLIP-L (`clip_l`) and bigG (`clip_g`), each encoder's LoRA under
    kohya's `lora_te1_` / `lora_te2_` with its own alpha, and a changed bigG weight as a `clip_g` delta."""
    b = tiny_sdxl_bundle()
    add_concept_tokens(b, [("<a>", "dog")], vectors=2)
    b.unet.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=["to_q", "to_v"]))
    add_text_encoder_lora(b.text_encoder, LoraConfig(r=2, lora_alpha=8.0, target_modules=["q_proj"]))
    add_text_encoder_lora(b.text_encoder_2, LoraConfig(r=2, lora_alpha=4.0, target_modules=["v_proj"]))
    back = H.handback(b)
    rows = back.embeddings["unconfused.a"]
    assert set(rows) == {"clip_l", "clip_g"}
    assert rows["clip_l"].shape == (2, b.text_encoder.config.hidden_size)
    assert rows["clip_g"].shape == (2, b.text_encoder_2.config.hidden_size)
    assert rows["clip_l"].shape[1] != rows["clip_g"].shape[1]  # (the tiny encoders differ in width)
    alphas = {k.split("_", 2)[1]: float(v) for k, v in back.lora.items() if k.endswith(".alpha")}
    assert alphas == {"unet": 2.0, "te1": 8.0, "te2": 4.0}, alphas
    mods = H.lora_modules(back.lora)
    assert any(m.startswith("lora_te2_") and m.endswith("_v_proj") for m in mods)
    assert not any(m.startswith("lora_te_") for m in mods)

    comfy_state = {}
    for attr, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        te_state = getattr(b, attr).state_dict()
        comfy_state.update({f"{key}.transformer." + k.replace(".base_layer.", "."): v.clone()
                            for k, v in hf_text_keys(te_state).items() if "lora_" not in k})
    assert H.bundle_text_deltas(b, comfy_state) == {}
    key = "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    comfy_state[key] = comfy_state[key] + 0.25
    deltas = H.bundle_text_deltas(b, comfy_state)
    assert list(deltas) == [key] and torch.allclose(deltas[key], torch.full_like(deltas[key], -0.25))


def test_apply_refuses_an_untrained_model_and_another_family():
    sd1 = _fake_model("SD15")
    sd1.model.model_config = type("SD15", (), {})()
    clip = type("CLIP", (), {})()
    clip.cond_stage_model = torch.nn.Module()
    clip.patcher = type("ModelPatcher", (), {"patches": {}, "backup": {}})()
    with pytest.raises(UnconfusedError, match="no trained concepts"):
        UnconfusedApplyToComfy().apply(sd1, clip, tiny_bundle(), 1.0, 1.0)
    b = tiny_bundle()
    b.family = "sd2"
    with pytest.raises(UnconfusedError, match="trained on a SD2 model but the MODEL is SD1"):
        UnconfusedApplyToComfy().apply(sd1, clip, b, 1.0, 1.0)
    with pytest.raises(UnconfusedError, match="trained on a SDXL model but the MODEL is SD1"):
        UnconfusedApplyToComfy().apply(sd1, clip, tiny_sdxl_bundle(), 1.0, 1.0)


def test_embedding_weights_equal_in_comfyuis_dtype_are_not_sent():
    b = tiny_bundle()
    te_state = b.text_encoder.state_dict()
    comfy16 = {"clip_l.transformer." + k: v.half() for k, v in hf_text_keys(te_state).items()}
    assert H.text_encoder_deltas(te_state, comfy16) == {}  # our fp32 copy of ComfyUI's fp16 CLIP: unchanged


class _FakeInnerTokenizer:
    """ComfyUI's SDTokenizer as far as the hand-off uses it: `embedding:<name>` words are looked up with
    `_try_get_embedding` (2-tuple in 2024, 3-tuple since 2025), other words become their text."""

    def __init__(self, three: bool):
        self.embedding_directory = None
        self.three = three

    def _try_get_embedding(self, name):
        return (None, name, "") if self.three else (None, "")

    def tokenize_with_weights(self, text, return_word_ids=False):
        out = []
        for word in text.split():
            if word.startswith("embedding:") and self.embedding_directory is not None:
                found = self._try_get_embedding(word[len("embedding:"):])
                out.append(found[0] if found[0] is not None else f"missing:{word}")
            else:
                out.append(word)
        return out


class _FakeOuterTokenizer:
    def __init__(self, three: bool):
        self.clip = "clip_l"
        self.clip_l = _FakeInnerTokenizer(three)

    def tokenize_with_weights(self, text, return_word_ids=False):
        return {"l": getattr(self, self.clip).tokenize_with_weights(text, return_word_ids)}


class _FakePatcher:
    def __init__(self):
        self.patches, self.backup = {}, {}

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for k, v in patches.items():
            self.patches.setdefault(k, []).append((strength_patch, v, strength_model))
        return list(patches)


class _FakeClip:
    def __init__(self, three: bool):
        self.patcher, self.tokenizer, self.cond_stage_model = _FakePatcher(), _FakeOuterTokenizer(three), None

    def clone(self):
        n = _FakeClip.__new__(_FakeClip)
        n.patcher, n.tokenizer, n.cond_stage_model = _FakePatcher(), self.tokenizer, self.cond_stage_model
        n.patcher.patches = {k: list(v) for k, v in self.patcher.patches.items()}
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)["l"]


@pytest.mark.parametrize("three", [False, True], ids=["comfyui-2024", "comfyui-2025+"])
def test_clip_gets_concept_tokens_in_memory_and_applies_chain(monkeypatch, three):
    """host.comfy_apply_concepts on stand-ins for ComfyUI's objects: `<a>` in a prompt reaches the
    tokenizer as the token's vectors, the input CLIP is unchanged, a second Apply keeps the first's
    tokens, and the LoRA goes through ComfyUI's key map as patches with the strength."""
    import sys
    import types

    from unconfused.engine import host

    lora_mod = types.SimpleNamespace(
        model_lora_keys_unet=lambda model, km: {**km, "lora_unet_x": "diffusion_model.x.weight"},
        model_lora_keys_clip=lambda model, km: km,
        load_lora=lambda lora, km: {km[k.split(".")[0]]: ("lora", k) for k in lora if k.split(".")[0] in km})
    monkeypatch.setitem(sys.modules, "comfy.lora", lora_mod)
    model = type("Model", (), {})()
    model.model, model.patcher = None, _FakePatcher()
    model.clone = lambda: (lambda m: (setattr(m, "patches", {}), m)[1])(_FakePatcher())
    clip = _FakeClip(three)
    va, vb = torch.ones(2, 4), torch.zeros(1, 4)
    m2, c2, unknown = host.comfy_apply_concepts(
        model, clip, {"lora_unet_x.lora_up.weight": torch.ones(1), "lora_unet_y.lora_up.weight": torch.ones(1)}, {},
        {"unconfused.a": va}, H.prompt_rewriter(["<a>"]), 0.7, 1.0)
    assert unknown == ["lora_unet_y"]
    assert m2.patches == {"diffusion_model.x.weight": [(0.7, ("lora", "lora_unet_x.lora_up.weight"), 1.0)]}
    toks = c2.tokenize("a photo of <a>, ok")
    assert toks[:3] == ["a", "photo", "of"] and toks[3] is va and toks[4:] == [",", "ok"]
    assert clip.tokenize("a photo of <a>") == ["a", "photo", "of", "<a>"]  # the input CLIP is unchanged
    _, c3, _ = host.comfy_apply_concepts(model, c2, {}, {}, {"unconfused.b": vb}, H.prompt_rewriter(["<b>"]), 1, 1)
    toks = c3.tokenize("<a> and <b>")
    assert toks[0] is va and toks[1] == "and" and toks[2] is vb


class _FakeSDXLTokenizer:
    """ComfyUI's SDXLTokenizer: two inner tokenizers (no `clip` attribute), each reading its own key of
    an embedding file (`clip_l`, `clip_g`)."""

    def __init__(self):
        self.clip_l, self.clip_g = _FakeInnerTokenizer(False), _FakeInnerTokenizer(False)
        self.clip_l.embedding_key, self.clip_g.embedding_key = "clip_l", "clip_g"

    def tokenize_with_weights(self, text, return_word_ids=False):
        return {"l": self.clip_l.tokenize_with_weights(text), "g": self.clip_g.tokenize_with_weights(text)}


def test_sdxl_clip_gets_each_encoders_rows(monkeypatch):
    import sys
    import types

    from unconfused.engine import host

    lora_mod = types.SimpleNamespace(model_lora_keys_unet=lambda model, km: km, model_lora_keys_clip=lambda m, km: km,
                                     load_lora=lambda lora, km: {})
    monkeypatch.setitem(sys.modules, "comfy.lora", lora_mod)
    model = type("Model", (), {})()
    model.model = None
    model.clone = lambda: (lambda m: (setattr(m, "patches", {}), m)[1])(_FakePatcher())
    clip = _FakeClip(False)
    clip.tokenizer = _FakeSDXLTokenizer()
    rows = {"clip_l": torch.ones(2, 3), "clip_g": torch.zeros(2, 5)}
    _, c2, _ = host.comfy_apply_concepts(model, clip, {}, {}, {"unconfused.a": rows}, H.prompt_rewriter(["<a>"]), 1, 1)
    toks = c2.tokenizer.tokenize_with_weights("<a> dog")
    assert toks["l"][0] is rows["clip_l"] and toks["g"][0] is rows["clip_g"] and toks["l"][1] == toks["g"][1] == "dog"
    assert clip.tokenizer.clip_g.embedding_directory is None  # the input CLIP's tokenizers are unchanged
