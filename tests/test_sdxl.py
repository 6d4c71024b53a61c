"""SDXL as one model family (engine/models/families.py `SDXL`): loading single files (LDM keys as ComfyUI and
A1111 save them) and diffusers folders, both text encoders and tokenizers, conditioning equal to
diffusers' own StableDiffusionXLPipeline, concept tokens in both encoders, exports, LoRA training,
sampling - on a tiny SDXL-shaped model (same block layout and key names, narrow and shallow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import comfyui_dir, sdxl_ldm_state_dict, sdxl_parts, tiny_sdxl_bundle, write_sdxl_checkpoint
from unconfused.engine.models import configs as cfg
from unconfused.engine.errors import UnconfusedError
from unconfused.engine.models.families import SDXL, family_of
from unconfused.engine.models.loading import bundle_from_ldm_state_dict, load_model
from unconfused.engine.models.concept_tokens import add_concept_tokens, token_rows

HERE = Path(__file__).resolve().parent
PROMPTS = ["a photo of a dog on a beach", ""]


@pytest.fixture(scope="module")
def parts():
    return sdxl_parts("tiny", seed=3)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, parts):
    return write_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors", seed=3,
                                 dtype=torch.float32)


@pytest.fixture(scope="module")
def bundle(tiny_file):
    return load_model(tiny_file)


def _pipe(b):
    return family_of(b).pipeline(b, b.noise_scheduler())


# ------------------------------------------------------------------ loading
def test_single_file_loads_every_part_with_its_weights(parts, bundle):
    unet, vae, te, te2 = parts
    assert bundle.family == "sdxl" and bundle.prediction_type == "epsilon" and bundle.spec.title == "Stable Diffusion XL"
    for ours, ref in ((bundle.unet, unet), (bundle.vae, vae), (bundle.text_encoder, te),
                      (bundle.text_encoder_2, te2)):
        theirs = ref.state_dict()
        mine = ours.state_dict()
        assert set(mine) == set(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), type(ref).__name__
    assert type(bundle.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert bundle.vae.config.scaling_factor == 0.13025 and bundle.spec.default_resolution(bundle) == 1024
    # both tokenizers: one vocabulary, padded with <|endoftext|> and with "!" (id 0)
    assert bundle.tokenizer.pad_token == "<|endoftext|>" and bundle.tokenizer_2.pad_token == "!"
    assert bundle.tokenizer_2.pad_token_id == 0


def test_second_ids_are_the_second_tokenizers(bundle):
    for prompt in ["a photo of a dog", "", "x " * 100]:
        ids = bundle.tokenize([prompt])
        ref = bundle.tokenizer_2([prompt], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        assert torch.equal(bundle.spec.second_ids(bundle, ids), ref), prompt


def test_conditioning_equals_diffusers_sdxl_pipeline(bundle):
    """Hidden states (both encoders' penultimate layers concatenated), the pooled projected bigG
    embedding and the time ids are exactly what StableDiffusionXLPipeline computes."""
    pipe = _pipe(bundle)
    with torch.no_grad():
        ours = bundle.condition(PROMPTS[:1])
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False)
        assert ours.hidden.shape == (1, 77, 96) and torch.allclose(ours.hidden, emb, atol=1e-6)
        assert torch.allclose(ours.added["text_embeds"], pooled, atol=1e-6)
        ids = pipe._get_add_time_ids((768, 1024), (0, 0), (768, 1024), dtype=torch.float32,
                                     text_encoder_projection_dim=64)
        assert torch.equal(SDXL.time_ids(768, 1024), ids)
        # the UNet call fills the time ids from the latents' size (any aspect ratio / bucket)
        x, t = torch.randn(2, 4, 12, 16), torch.tensor([10, 700])
        out = bundle.spec.call_unet(bundle.unet, x, t, ours)
        ref = bundle.unet(x, t, ours.hidden.expand(2, -1, -1), added_cond_kwargs={
            "text_embeds": pooled.expand(2, -1), "time_ids": SDXL.time_ids(96, 128, batch=2)}).sample
        assert torch.allclose(out, ref, atol=1e-6)
        wrong = bundle.unet(x, t, ours.hidden.expand(2, -1, -1), added_cond_kwargs={
            "text_embeds": pooled.expand(2, -1), "time_ids": SDXL.time_ids(128, 128, batch=2)}).sample
        assert not torch.allclose(out, wrong, atol=1e-4)  # the time ids do reach the UNet


def test_v_prediction_by_comfyuis_rule_or_set_on_the_node(tmp_path, parts):
    sd = sdxl_ldm_state_dict(*parts, v_prediction=True)
    assert bundle_from_ldm_state_dict(dict(sd), "v.safetensors").prediction_type == "v_prediction"
    b = bundle_from_ldm_state_dict(dict(sd), "v.safetensors", prediction="epsilon")
    assert b.prediction_type == "epsilon" and "looks like v_prediction" in b.notes[0]


@pytest.mark.parametrize("change,needle", [
    (lambda sd: {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in sd.items()
                 if not k.startswith("conditioner.embedders.0.")}, "refiner"),
    (lambda sd: {**sd, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}, "inpainting"),
    (lambda sd: {**sd, "edm_mean": torch.zeros(1), "edm_std": torch.zeros(1)}, "EDM"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("conditioner.embedders.1.")}, "OpenCLIP-bigG"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, "no the VAE"),
])
def test_refiner_inpainting_and_partial_files_are_refused_with_a_sentence(parts, change, needle):
    sd = change(sdxl_ldm_state_dict(*parts))
    with pytest.raises(UnconfusedError) as e:
        bundle_from_ldm_state_dict(sd, "x.safetensors")
    assert needle.replace("no the ", "no ") in str(e.value).replace("no the ", "no ") and "x.safetensors" in str(e.value)


def test_diffusers_folder_loads_as_sdxl(tmp_path, parts, bundle):
    from diffusers import DDPMScheduler

    folder = tmp_path / "tiny-sdxl"
    pipe = _pipe(bundle)
    pipe.scheduler = DDPMScheduler(**bundle.scheduler_config, prediction_type="v_prediction")
    pipe.save_pretrained(folder)
    b = load_model(folder)
    assert b.family == "sdxl" and b.prediction_type == "v_prediction" and b.tokenizer_2.pad_token == "!"
    with torch.no_grad():
        c1, c2 = bundle.condition(PROMPTS), b.condition(PROMPTS)
    assert torch.equal(c1.hidden, c2.hidden) and torch.equal(c1.added["text_embeds"], c2.added["text_embeds"])


# ------------------------------------------------------------------ tokens and exports
def test_concept_tokens_get_rows_in_both_encoders_from_each_class_word(bundle, tmp_path):
    from unconfused.engine.models.exports import save_embedding

    b = bundle.clone()
    add_concept_tokens(b, [("<kiki>", "cat")], vectors=2)
    cat = b.tokenizer("cat", add_special_tokens=False).input_ids
    for attr, width in (("text_encoder", 32), ("text_encoder_2", 64)):
        rows = token_rows(b, "<kiki>", attr)
        base = getattr(b, attr).get_input_embeddings().base.weight
        assert rows.shape == (2, width) and torch.allclose(rows, base[cat].mean(0).expand(2, -1))
    state = b.spec.embedding_state(b, "<kiki>")
    path = save_embedding(tmp_path / "kiki.safetensors", state, "sdxl", metadata={})
    f = load_file(path)
    assert set(f) == {"clip_l", "clip_g"} and f["clip_l"].shape == (2, 32) and f["clip_g"].shape == (2, 64)
    # the token changes both encoders' outputs; the pooled output stays at the end token
    with torch.no_grad():
        a, c = b.condition(["a photo of <kiki>"]), b.condition(["a photo of cat cat"])
    assert torch.allclose(a.hidden, c.hidden, atol=1e-5)
    assert torch.allclose(a.added["text_embeds"], c.added["text_embeds"], atol=1e-5)
    assert bundle.added_tokens == {}  # the clone changed, not its source


KEYMAP_RUNNER = r"""
import json, os, sys
job = json.loads(open(sys.argv[1]).read())
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, job["comfy"])
os.chdir(job["comfy"])
import comfy.options
comfy.options.enable_args_parsing()
import comfy.lora

class Keys:  # what the key maps read: the model's state dict keys (and the UNet config)
    def __init__(self, keys, unet_config=None):
        self.keys = keys
        self.model_config = type("C", (), {"unet_config": unet_config})
    def state_dict(self):
        return dict.fromkeys(self.keys)

key_map = {}
comfy.lora.model_lora_keys_unet(Keys(job["unet_keys"], job["unet_config"]), key_map)
comfy.lora.model_lora_keys_clip(Keys(job["clip_keys"]), key_map)
json.dump(sorted(key_map), open(job["out"], "w"))
"""


def comfy_key_map(unet_keys: list[str], clip_keys: list[str], unet_config: dict, tmp_path: Path) -> set[str]:
    """The LoRA key names stock ComfyUI's LoraLoader maps (comfy.lora.model_lora_keys_unet/clip), for a
    model with these state-dict keys; run in its own process (ComfyUI's modules stay out of this one)."""
    job = {"comfy": str(comfyui_dir()), "unet_keys": unet_keys, "clip_keys": clip_keys, "unet_config": unet_config,
           "out": str(tmp_path / "keys.json")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "runner.py").write_text(KEYMAP_RUNNER)
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads((tmp_path / "keys.json").read_text()))


def comfy_sdxl_unet_config(config: dict) -> dict:
    """ComfyUI's unet_config for a diffusers SDXL-layout config (what model_detection reads from a file)."""
    from tiny_models import sdxl_ldm_unet_keys  # noqa: F401 (same derivation)

    n = len(config["block_out_channels"])
    tl, lpb = config["transformer_layers_per_block"], config["layers_per_block"]
    cross = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    return {"num_res_blocks": [lpb] * n, "channel_mult": list(range(n)),
            "transformer_depth": sum(([tl[x] if cross[x] else 0] * lpb for x in range(n)), []),
            "transformer_depth_output": sum(([tl[x] if cross[x] else 0] * (lpb + 1) for x in range(n)), []),
            "transformer_depth_middle": tl[-1]}


@pytest.fixture(scope="module")
def trained(tiny_file, tmp_path_factory):
    """Three LoRA + tokens steps on the tiny SDXL with text-encoder LoRA on both encoders, exported."""
    from test_lora import concept_set
    from unconfused.engine import host
    from unconfused.trainers.lora import LoraSettings, train_lora

    root = tmp_path_factory.mktemp("sdxl-train")
    host.reset_standalone()
    host.configure(models_dir=root / "models", output_dir=root / "output", temp_dir=root / "temp")
    (root / "temp").mkdir()
    s = LoraSettings(name="xl", steps=3, resolution=64, rank=4, alpha=2.0, checkpoint_every=0, resume="restart",
                     export=True, text_encoder_lora=True, unet_lr=1e-2, text_encoder_lr=1e-2, token_lr=1e-2,
                     validation_prompts=["<a> with <b>"], validation_steps=2)
    result = train_lora(load_model(tiny_file), concept_set(), s)
    host.reset_standalone()
    return result


def test_lora_and_tokens_train_on_sdxl_and_export_kohya_sdxl_keys(trained):
    assert len(trained.losses) == 3 and all(l == l for l in trained.losses)
    lora = load_file(trained.exports["lora"])
    prefixes = {k.split("_")[1] for k in lora}
    assert prefixes == {"unet", "te1", "te2"}, prefixes
    assert any(k.startswith("lora_unet_down_blocks_2_attentions_0_transformer_blocks_1_attn2_to_k") for k in lora)
    alphas = [v for k, v in lora.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 2.0 for a in alphas)
    emb = load_file(trained.exports["embedding:<a>"])
    assert set(emb) == {"clip_l", "clip_g"} and emb["clip_g"].shape[-1] == 64
    assert trained.validation is not None and trained.validation.shape == (1, 64, 64, 3)


def test_diffusers_load_lora_weights_takes_the_export(trained, parts):
    """StableDiffusionXLPipeline built from the untrained tiny parts + `load_lora_weights(file)` gives the
    trained UNet's and both text encoders' outputs (every LoRA key was read, none ignored)."""
    import copy

    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from unconfused.engine.models.clip_tokenizer import clip_tokenizer

    unet, vae, te, te2 = (copy.deepcopy(m) for m in parts)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(pad="!"), unet=unet,
                                     scheduler=DDPMScheduler(**cfg.SCHEDULER))
    tb = trained.bundle
    ids = tb.tokenize(["a photo of a dog"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        before = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
        pipe.load_lora_weights(str(trained.exports["lora"]))
        for mine, theirs in ((tb.text_encoder, pipe.text_encoder), (tb.text_encoder_2, pipe.text_encoder_2)):
            ours = mine(ids, output_hidden_states=True).hidden_states[-2]
            assert torch.allclose(ours, theirs(ids, output_hidden_states=True).hidden_states[-2], atol=1e-5)
        assert not torch.allclose(before, tb.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2],
                                  atol=1e-5)  # the LoRA did change the encoder
        cond = tb.condition(["a photo of a dog"])
        added = {"text_embeds": cond.added["text_embeds"], "time_ids": SDXL.time_ids(64, 64)}
        ours = tb.unet(x, t, cond.hidden, added_cond_kwargs=added).sample
        assert torch.allclose(ours, pipe.unet(x, t, cond.hidden, added_cond_kwargs=added).sample, atol=1e-5)


def test_comfyuis_sdxl_key_map_covers_every_exported_key(trained, tiny_file, tmp_path):
    """Stock LoraLoader maps every key of the export (zero "lora key not loaded"): ComfyUI's own key
    maps for SDXL, on the tiny model's state-dict keys as ComfyUI names them."""
    sd = load_file(tiny_file)
    unet_keys = [k[len("model."):] for k in sd if k.startswith("model.diffusion_model.")]
    b = trained.bundle
    clip_keys = [f"clip_l.transformer.{k}" for k in _hf_keys(b.text_encoder)] + \
        [f"clip_g.transformer.{k}" for k in _hf_keys(b.text_encoder_2)]
    mapped = comfy_key_map(unet_keys, clip_keys, comfy_sdxl_unet_config(dict(b.unet.config)), tmp_path)
    lora = load_file(trained.exports["lora"])
    names = {k.split(".")[0] for k in lora}
    missing = sorted(n for n in names if n not in mapped)
    assert not missing, missing[:10]
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}


def _hf_keys(te) -> list[str]:
    """A text encoder's base weight names as ComfyUI's CLIP holds them (`text_model.*`, no LoRA)."""
    from unconfused.engine.models.loading import hf_text_keys

    keys = [k.replace(".base_layer", "") for k in te.state_dict() if "lora_" not in k and "new_rows" not in k]
    return list(hf_text_keys(dict.fromkeys(k.replace("token_embedding.base.", "token_embedding.") for k in keys)))


def test_training_sends_each_images_original_size_and_crop(bundle):
    """A 96x144 photo trained at 64 px: resized to 64x96, centre-cropped at left 16; the UNet gets
    time ids (96, 144, 0, 16, 64, 64), as diffusers' SDXL trainer conditions (not the target size twice)."""
    from unconfused.engine import host
    from unconfused.engine.data.concepts import Concept, make_concept_set
    from unconfused.trainers.lora import LoraSettings, LoraTrainer

    cs = make_concept_set([Concept("<w>", "dog", [torch.rand(96, 144, 3), torch.rand(96, 144, 3)])])
    tr = LoraTrainer(bundle.clone(), cs, LoraSettings(name="w", steps=1, resolution=64, export=False,
                                                      checkpoint_every=0, resume="restart"))
    seen = []
    forward = tr.bundle.unet.forward

    def spy(*a, **k):
        seen.append(k["added_cond_kwargs"]["time_ids"].clone())
        return forward(*a, **k)

    tr.bundle.unet.forward = spy
    with host.training_mode():
        tr.batch_loss(tr.draw_batch(tr.data, 2), 1.0)
    assert seen and torch.equal(seen[0], torch.tensor([[96., 144., 0., 16., 64., 64.]] * 2))


# ------------------------------------------------------------------ CLIF
from test_clif import TOKENS, dataset, scorer  # noqa: E402,F401 (the CLIF tests' tiny tower and dataset)
from test_clif import settings as clif_settings  # noqa: E402


def test_clif_on_sdxl_trains_clip_l_against_vit_l_and_exports_both_keys(bundle, dataset, scorer):
    """CLIF on SDXL trains the CLIP-L encoder (rows + LoRA) against the ViT-L-like tower: its text
    feature is CLIP-L's own pooled output (not the UNet's concatenated conditioning); the two tokens
    separate; bigG's rows stay at their class-word start; exports carry clip_l + clip_g and lora_te1_."""
    from unconfused.trainers.clif import ClifTrainer

    tr = ClifTrainer(bundle, dataset, scorer, clif_settings(name="xl", steps=20, export=True))
    ids = tr.bundle.tokenize(["a photo of a thing"])
    with torch.no_grad():
        pooled = tr.bundle.text_encoder(ids, output_hidden_states=False).pooler_output
        feat = tr.text_features(["a photo of a thing"])
    assert torch.allclose(feat, torch.nn.functional.normalize(pooled @ tr.proj, dim=-1), atol=1e-5)
    g_before = {t: token_rows(tr.bundle, t, "text_encoder_2") for t in TOKENS}
    result = tr.run()
    b, a = result.metrics["before"], result.metrics["after"]
    print(f"\nCLIF on tiny SDXL: max pair cosine {b['max_pair_cosine']:.3f} -> {a['max_pair_cosine']:.3f}, concept "
          f"accuracy {b['concept_accuracy']:.2f} -> {a['concept_accuracy']:.2f}")
    assert b["max_pair_cosine"] > 0.999 and a["max_pair_cosine"] < 0.9
    for t in TOKENS:
        assert torch.equal(token_rows(result.bundle, t, "text_encoder_2"), g_before[t])
    emb = load_file(result.exports[f"embedding:{TOKENS[0]}"])
    assert set(emb) == {"clip_l", "clip_g"} and emb["clip_g"].shape == (1, 64)
    lora = load_file(result.exports["lora"])
    assert lora and all(k.startswith("lora_te1_text_model_encoder_layers_") for k in lora)


# ------------------------------------------------------------------ sampler
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_sampler_draws_any_aspect_ratio_with_attention_maps(bundle, scheduler):
    """The multi-concept sampler through StableDiffusionXLPipeline: 64x96 (portrait) with the time ids
    of that size and seeds independent of the batch; per-token attention maps at the 32x32-at-1024
    level (square here: non-square maps are engine/vision/attention.py's, changed in a parallel branch)."""
    from unconfused.engine.models.sampling import generate

    b = bundle.clone()
    add_concept_tokens(b, [("<a>", "dog"), ("<b>", "cat")])
    seen = []
    forward = b.unet.forward

    def spy(*a, **k):
        seen.append(k["added_cond_kwargs"]["time_ids"].clone())
        return forward(*a, **k)

    b.unet.forward = spy
    prompts = ["a photo of <a> and <b>", "a photo of <b>"]
    imgs = generate(b, prompts, steps=2, width=64, height=96, seeds=[1, 2], scheduler=scheduler)
    assert imgs.shape == (2, 96, 64, 3) and torch.isfinite(imgs).all()
    assert torch.equal(seen[0][0], torch.tensor([96., 64., 0., 0., 96., 64.]))
    alone = generate(b, prompts[1:], steps=2, width=64, height=96, seeds=[2], scheduler=scheduler)
    assert torch.allclose(alone[0], imgs[1], atol=1e-5)
    _, _, maps = generate(b, prompts, steps=2, width=64, height=64, seeds=[1, 2], scheduler=scheduler,
                          attention_tokens=["<a>", "<b>"])
    assert maps.shape == (2, 2, 2, 2)  # 64 px -> 8x8 latents -> level 2: 2x2
    assert maps[0].sum() > 0 and maps[1, 0].abs().max() == 0 and maps[1, 1].sum() > 0  # <a> is not in prompt 2


# ------------------------------------------------------------------ mask EM
def test_mask_em_runs_on_sdxl_at_its_attention_level(bundle, dreambooth_dir):
    """The EM (Break-a-Scene-style) on the tiny SDXL: it captures the 1280-channel level (down_blocks.2,
    up_blocks.0: 32x32 at 1024 px), estimates masks each round and exports clip_l + clip_g rows."""
    from test_em import composite
    from test_em import settings as em_settings
    from unconfused.trainers import em as E

    layers = bundle.spec.attention_layers(bundle.unet)
    assert layers and all(n.startswith(("down_blocks.2.", "up_blocks.0.")) for n in layers)
    assert len(layers) == 2 * 2 + 3 * 2  # 2 down + 3 up attentions x 2 transformer blocks (full size: x 10)
    image, gt = composite(dreambooth_dir)
    scenes = E.make_scenes([image], "<dog> dog\n<cat> cat", gt)
    res = E.EMTrainer(bundle, scenes, em_settings(name="xl", export=True, inversion_steps=1, steps=3,
                                                  tokens_only_steps=1)).run()
    assert [r.step for r in res.rounds][-1] == 3
    assert all(r.masks.shape == (1, 2, 8, 8) for r in res.rounds)
    assert set(load_file(res.exports["embedding:<dog>"])) == {"clip_l", "clip_g"}
    assert {k.split("_")[1] for k in load_file(res.exports["lora"])} == {"unet"}


def test_cli_lora_job_on_an_sdxl_file(tmp_path, tiny_file, dreambooth_dir, capsys):
    """`python -m unconfused lora --config job.toml` with `model` = an SDXL single file."""
    from unconfused.app.cli import main

    config = tmp_path / "job.toml"
    config.write_text(f'model = "{tiny_file}"\nconcepts = ["{dreambooth_dir / "cat"}:<my-cat>:cat"]\n'
                      '[settings]\nname = "clixl"\nsteps = 2\nresolution = 64\ncheckpoint_every = 2\n')
    assert main(["lora", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["steps"] == 2
    emb = load_file(tmp_path / "models" / "embeddings" / "clixl_my-cat.safetensors")
    assert set(emb) == {"clip_l", "clip_g"}


def test_an_fp16_run_keeps_the_sdxl_vae_in_fp32(bundle):
    """SDXL's VAE overflows in fp16 (diffusers' force_upcast): a run in fp16 moves the UNet and both
    encoders to fp16 and leaves the VAE fp32, fed in its own dtype; the step's loss is finite."""
    from unconfused.engine import host
    from unconfused.engine.data.concepts import Concept, make_concept_set
    from unconfused.trainers.lora import LoraSettings, LoraTrainer

    cs = make_concept_set([Concept("<w>", "dog", [torch.rand(64, 64, 3), torch.rand(64, 64, 3)])])
    for cache in (True, False):
        tr = LoraTrainer(bundle.clone(), cs, LoraSettings(name=f"h{cache}", steps=1, resolution=64, export=False,
                                                          checkpoint_every=0, resume="restart", precision="fp16",
                                                          cache_latents=cache))
        b = tr.bundle
        assert b.vae.dtype == torch.float32 and b.text_encoder_2.text_projection.weight.dtype == torch.float16
        assert next(b.unet.parameters()).dtype == torch.float16
        with host.training_mode():
            loss = tr.batch_loss(tr.draw_batch(tr.data, 2), 1.0)
        assert torch.isfinite(loss)
