"""Training the full-size SDXL architecture (random weights, the cached fp16 file of
tests/tiny_models.cached_sdxl_checkpoint) one step at 64 px, through the nodes (called as
ComfyUI calls them) and through the CLI job command; the exports then load in stock ComfyUI
(LoraLoader and `embedding:`, zero skipped keys) and in diffusers (`load_lora_weights`, the values
we trained). bf16 frozen weights on the CPU (`precision = bf16`; the trainer keeps the trained
tensors fp32), so our side holds ~7 GB; run each test alone (`fullsize`)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sdxl_comfy import MMAP_READER
from tiny_models import cached_sdxl_checkpoint, comfyui_dir

pytestmark = [pytest.mark.fullsize, pytest.mark.comfyui]

STOCK_LOAD = r'''
import json, logging, os, sys
job = json.loads(open(sys.argv[1]).read())
sys.argv = [sys.argv[0], "--cpu", "--fp16-unet", "--fp16-text-enc", "--fp32-vae"]
sys.path.insert(0, job["comfy"])
os.chdir(job["comfy"])
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger().addHandler(Catch(level=logging.WARNING))
import comfy.options
comfy.options.enable_args_parsing()
import resource, torch
import comfy.sd, comfy.utils
''' + MMAP_READER + r'''
_load = comfy.utils.load_torch_file
comfy.utils.load_torch_file = lambda ckpt, *a, **k: mmap_safetensors(ckpt) if ckpt == job["ckpt"] else _load(ckpt, *a, **k)
results = []
with torch.inference_mode():
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(job["ckpt"], output_vae=False, output_clip=True,
                                                                embedding_directory=job["embeddings"])
    for run in job["runs"]:  # each LoRA on the same loaded checkpoint, as two LoraLoader nodes would
        warnings.clear()
        lora = comfy.utils.load_torch_file(run["lora"], safe_load=True)
        model2, clip2 = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)  # LoraLoader
        out = {"model_type": type(model.model).__name__, "lora_keys": len(lora),
               "unet_patches": len(model2.patches), "clip_patches": len(clip2.patcher.patches)}
        cond = {}
        for name, prompt in run["prompts"].items():
            c, pooled = clip2.encode_from_tokens(clip2.tokenize(prompt), return_pooled=True)
            cond[name] = c.float()
        out["lora_warnings"] = [w for w in warnings if "lora key not loaded" in w]
        out["embedding_warnings"] = [w for w in warnings if "embedding" in w.lower()]
        results.append({"info": out, "cond": cond})
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 2**20
for r in results:
    r["info"]["peak_rss_gb"] = peak
torch.save(results, job["out"])
'''


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited by a child process)."""
    return [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0] / 2**20


def stock_comfy_loads(tmp_path, ckpt, emb_dir, runs: list[dict]) -> list[dict]:
    """Stock ComfyUI in its own process: the checkpoint once, then LoraLoader with each run's LoRA and
    prompts with our `embedding:` files; per run, what it logged and the conditioning it made."""
    job = {"comfy": str(comfyui_dir()), "ckpt": str(ckpt), "embeddings": str(emb_dir), "runs": runs,
           "out": str(tmp_path / "stock.pt")}
    (tmp_path / "stock_job.json").write_text(json.dumps(job))
    (tmp_path / "stock_runner.py").write_text(STOCK_LOAD)
    proc = subprocess.run([sys.executable, str(tmp_path / "stock_runner.py"), str(tmp_path / "stock_job.json")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp_path / "stock.pt", weights_only=True)


def check_in_diffusers(bundle, lora_path, emb_path, *, trained_adapter: bool) -> None:
    """diffusers' load_lora_weights on the model (as a second adapter "from_file"): every UNet module of
    the file gets its weights - equal to what we trained (`trained_adapter`: the bundle holds our trained
    LoRA as "default"), else equal to the file's."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from unconfused.engine.models import configs as cfg

    lora = load_file(lora_path)
    assert {k.split("_")[1] for k in lora} == {"unet"}  # LoRA + tokens: the UNet LoRA (no text-encoder LoRA)
    n_modules = len(lora) // 3  # lora_down, lora_up, alpha
    assert n_modules == 70 * 2 * 4  # every SDXL transformer block: attn1 + attn2, q/k/v/out
    emb = load_file(emb_path)
    assert set(emb) == {"clip_l", "clip_g"} and emb["clip_l"].shape[-1] == 768 and emb["clip_g"].shape[-1] == 1280

    pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder,
                                     text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                     tokenizer_2=bundle.tokenizer_2, unet=bundle.unet,
                                     scheduler=DDPMScheduler(**cfg.SCHEDULER))
    pipe.load_lora_weights(str(lora_path), adapter_name="from_file")
    params = dict(bundle.unet.named_parameters())
    loaded = {n: p for n, p in params.items() if ".from_file." in n}
    assert len(loaded) == 2 * n_modules
    if trained_adapter:
        for n, p in loaded.items():
            ours = params[n.replace(".from_file.", ".default.")]
            assert torch.equal(p.float(), ours.to(p.dtype).float()), n
    else:  # the same tensors as the file's (names differ: compare the sorted norms)
        norms = sorted(float(p.float().norm()) for n, p in loaded.items() if "lora_B" in n)
        file_norms = sorted(float(v.to(loaded[next(iter(loaded))].dtype).float().norm())
                            for k, v in lora.items() if "lora_up" in k)
        assert norms == pytest.approx(file_norms, rel=1e-6) and max(norms) > 0
    bundle.unet.delete_adapters(["from_file"])


def check_in_stock_comfyui(tmp_path, ckpt, exports: list[tuple[Path, Path]]) -> list[dict]:
    """Stock ComfyUI loads each (LoRA, embedding) pair with zero "lora key not loaded" and no embedding
    warning, every UNet module of the LoRA patched, and the token's embedding changes the conditioning."""
    runs = [{"lora": str(lora), "prompts": {"token": f"a photo of embedding:{emb.stem} dog", "plain": "a photo of a dog"}}
            for lora, emb in exports]
    (emb_dir,) = {emb.parent for _, emb in exports}
    infos = []
    for (lora, _), stock in zip(exports, stock_comfy_loads(tmp_path, ckpt, emb_dir, runs)):
        info = stock["info"]
        assert info["model_type"] == "SDXL", info
        assert info["lora_warnings"] == [] and info["embedding_warnings"] == [], info
        assert info["unet_patches"] == len(load_file(lora)) // 3, info  # every UNet module of the file patched
        assert not torch.allclose(stock["cond"]["token"], stock["cond"]["plain"])
        infos.append(info)
    return infos


def concept_inputs(dreambooth_dir):
    from unconfused.nodes.concepts import (
        UnconfusedConceptFromFolder,
        UnconfusedConceptSet,
    )

    (dog,) = UnconfusedConceptFromFolder().make(str(dreambooth_dir / "dog2"), "<my-dog>", "dog")["result"]
    return UnconfusedConceptSet().gather(concept_1=dog)["result"][0]


def widget_values(node_cls, **given) -> dict:
    """What ComfyUI passes a node: every widget at its default, then the given ones."""
    spec = node_cls.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, (kind, *opts) in spec.get(group, {}).items():
            if opts and "default" in opts[0]:
                out[name] = opts[0]["default"]
            elif isinstance(kind, list):
                out[name] = kind[0]
    out.update(given)
    return out


def train_through_the_cli(tmp_path, ckpt, dreambooth_dir) -> tuple[Path, Path, float, float]:
    """`python -m unconfused lora --config job.toml` in its own process, as a user runs it: its exports,
    wall time and peak RSS."""
    config = tmp_path / "job.toml"
    config.write_text(f'model = "{ckpt}"\nconcepts = ["{dreambooth_dir / "dog2"}:<my-dog>:dog"]\n'
                      '[settings]\nname = "clixlfull"\nsteps = 1\nresolution = 64\ncheckpoint_every = 0\n'
                      'precision = "bf16"\nrank = 4\nalpha = 4.0\nunet_lr = 1e-2\ntoken_lr = 1e-2\n')
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['unconfused', 'lora', "
                           f"'--config', {str(config)!r}]\ntry:\n    runpy.run_module('unconfused', run_name="
                           "'__main__')\nfinally:\n    print('PEAK_RSS_GB', [int(l.split()[1]) for l in open('/proc/self/status') "
                           "if l.startswith('VmHWM')][0] / 2**20)"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["steps"] == 1
    lora_path = tmp_path / "models" / "loras" / "clixlfull.safetensors"
    emb_path = tmp_path / "models" / "embeddings" / "clixlfull_my-dog.safetensors"
    assert lora_path.is_file() and emb_path.is_file()
    return lora_path, emb_path, wall, float(out.split("PEAK_RSS_GB")[1])


def test_fullsize_sdxl_trains_through_the_nodes_and_the_cli_and_the_exports_load_in_comfyui_and_diffusers(
        tmp_path, dreambooth_dir):
    """The full-size SDXL architecture (random weights) trains a step at 64 px through the CLI (its own
    process) and through the nodes (called as ComfyUI calls them); diffusers' load_lora_weights takes
    both LoRAs (the nodes' equal to what was trained), and stock ComfyUI loads both LoRAs and both
    embeddings with nothing left unloaded (one ComfyUI process, one checkpoint load: CI time)."""
    from unconfused.engine import host
    from unconfused.nodes.models import UnconfusedLoadCheckpoint
    from unconfused.nodes.lora import UnconfusedTrainLoRA

    ckpt = cached_sdxl_checkpoint("full")
    cli_lora, cli_emb, cli_wall, cli_rss = train_through_the_cli(tmp_path, ckpt, dreambooth_dir)

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / ckpt.name).symlink_to(ckpt)
    t0 = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI runs a node
        bundle, info = UnconfusedLoadCheckpoint().load(ckpt.name, "auto", "bf16")["result"]
        t_load = time.perf_counter() - t0
        assert "Stable Diffusion XL" in info and next(bundle.unet.parameters()).dtype == torch.bfloat16
        cs = concept_inputs(dreambooth_dir)
        kw = widget_values(UnconfusedTrainLoRA, name="xlfull", steps=1, resolution=64, precision="bf16",
                           checkpoint_every=0, resume="restart", rank=4, alpha=4.0, unet_lr=1e-2, token_lr=1e-2,
                           validation_prompts="")
        out = UnconfusedTrainLoRA().train(bundle, cs, unique_id="5", **kw)
    t_train = time.perf_counter() - t0 - t_load
    trained, _, _, text = out["result"]
    assert "trained 1 step" in text, text
    del bundle
    gc.collect()
    lora_path = tmp_path / "models" / "loras" / "xlfull.safetensors"
    emb_path = tmp_path / "models" / "embeddings" / "xlfull_my-dog.safetensors"
    assert lora_path.is_file() and emb_path.is_file()
    lora = load_file(lora_path)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_up" in k)  # the LoRA moved from zero
    ours_rss = peak_rss_gb()
    check_in_diffusers(trained, lora_path, emb_path, trained_adapter=True)
    check_in_diffusers(trained, cli_lora, cli_emb, trained_adapter=False)  # the CLI's file, as the file has it
    del trained, out
    gc.collect()  # our model out of memory before ComfyUI loads its own
    infos = check_in_stock_comfyui(tmp_path, ckpt, [(lora_path, emb_path), (cli_lora, cli_emb)])
    print(f"\nfull-size SDXL through the nodes: load {t_load:.0f} s, 1 step at 64 px {t_train:.0f} s, "
          f"peak RSS ours {ours_rss:.1f} GB (after the diffusers checks {peak_rss_gb():.1f} GB); through the CLI: "
          f"{cli_wall:.0f} s wall (load + train + export), peak RSS {cli_rss:.1f} GB; stock ComfyUI "
          f"{infos[0]['peak_rss_gb']:.1f} GB; wall {time.perf_counter() - t0 + cli_wall:.0f} s")
    host.reset_standalone()


DUAL_CLIP = r'''
import json, logging, os, sys
job = json.loads(open(sys.argv[1]).read())
sys.argv = [sys.argv[0], "--cpu", "--fp32-text-enc"]
sys.path.insert(0, job["comfy"])
os.chdir(job["comfy"])
records = []
class Catch(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().setLevel(logging.DEBUG)  # ComfyUI logs "clip unexpected" at debug level
logging.getLogger().addHandler(Catch(level=logging.DEBUG))
import comfy.options
comfy.options.enable_args_parsing()
import torch
import folder_paths, nodes
folder_paths.add_model_folder_path("clip", job["clip_dir"])
with torch.inference_mode():
    (clip,) = nodes.DualCLIPLoader().load_clip(job["clip_l"], job["clip_g"])  # the stock node
    out = {"model": type(clip.cond_stage_model).__name__}
    cond, pooled = clip.encode_from_tokens(clip.tokenize(job["prompt"]), return_pooled=True)
out["missing"] = [r for r in records if r.startswith("clip missing")]
out["unexpected"] = [r for r in records if r.startswith("clip unexpected")]
torch.save({"info": out, "cond": cond.float(), "pooled": pooled.float()}, job["out"])
'''


def full_size_text_encoders(seed: int = 0):
    """SDXL's CLIP-L and OpenCLIP-bigG (with its projection) at full size, random weights, fp32."""
    from accelerate import init_empty_weights
    from tiny_models import _randomize
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from unconfused.engine.models import configs as cfg

    gen = torch.Generator().manual_seed(seed)
    out = []
    for cls, config in ((CLIPTextModel, cfg.SDXL_TEXT_ENCODER), (CLIPTextModelWithProjection, cfg.SDXL_TEXT_ENCODER_2)):
        with init_empty_weights():
            m = cls(CLIPTextConfig(**config))
        m = m.to_empty(device="cpu").float()
        _randomize(m, gen)
        for name, buf in m.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1])[None])
        out.append(m.eval())
    return out


def test_fullsize_clif_clip_l_export_pairs_with_clip_g_in_stock_dualcliploader(tmp_path):
    """CLIF on SDXL exports its fine-tuned CLIP-L as a Hugging Face-keyed file (full text-encoder export,
    vocabulary-sized token table); stock DualCLIPLoader takes it with the model's CLIP-G (full-size
    architecture: ComfyUI's SDXL CLIP has fixed sizes): no unexpected key, no missing key but CLIP-L's unused
    text projection, and its SDXL conditioning and pooled output are ours."""
    from tiny_models import sdxl_parts
    from unconfused.engine.models.exports import save_text_encoder
    from unconfused.engine.models.loading import bundle_from_parts
    from unconfused.engine.models.concept_tokens import add_concept_tokens, concept_embedding
    from unconfused.trainers.clif import _StockTextEncoder

    te, te2 = full_size_text_encoders()
    unet, vae, _, _ = sdxl_parts("tiny")  # (the UNet and VAE play no part here)
    b = bundle_from_parts(unet, vae, te, text_encoder_2=te2, family="sdxl", name="xl-te")
    clip_dir = tmp_path / "clip"
    save_text_encoder(clip_dir / "clip_g.safetensors", b.text_encoder_2, metadata={})  # the model's CLIP-G
    # stand in for CLIF's training: concept rows and changed CLIP-L weights (as a merged LoRA or full fine-tune)
    add_concept_tokens(b, [("<a>", "dog")])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rows = concept_embedding(b.text_encoder).new_rows
        rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)
        for layer in getattr(b.text_encoder, "text_model", b.text_encoder).encoder.layers:
            w = layer.self_attn.q_proj.weight
            w.add_(0.02 * torch.randn(w.shape, generator=g))
    save_text_encoder(clip_dir / "xl_clif_clip_l.safetensors", _StockTextEncoder(b.text_encoder), metadata={})
    prompt = "a photo of a dog on a beach"
    with torch.no_grad():
        ours = b.condition([prompt])

    job = {"comfy": str(comfyui_dir()), "clip_dir": str(clip_dir), "clip_l": "xl_clif_clip_l.safetensors",
           "clip_g": "clip_g.safetensors", "prompt": prompt, "out": str(tmp_path / "dual.pt")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "runner.py").write_text(DUAL_CLIP)
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stock = torch.load(tmp_path / "dual.pt", weights_only=True)
    info = stock["info"]
    assert info["model"] == "SDXLClipModel", info
    # one key ComfyUI names missing: CLIP-L's text_projection (a CLIPTextModel has none; ComfyUI's CLIP-L
    # holds an identity projection then, and SDXL never reads CLIP-L's pooled output - bigG's is the one)
    assert info["missing"] == ["clip missing: ['text_projection.weight']"] and info["unexpected"] == [], info
    cond_err = float((ours.hidden - stock["cond"]).abs().max())
    pooled_err = float((ours.added["text_embeds"] - stock["pooled"]).abs().max())
    scale = float(stock["cond"].abs().max())
    print(f"\nDualCLIPLoader (CLIF CLIP-L + CLIP-G): cond max abs err {cond_err:.2e} / {scale:.1f}, "
          f"pooled {pooled_err:.2e} / {float(stock['pooled'].abs().max()):.1f}")
    assert cond_err <= 1e-3 * max(1.0, scale) and pooled_err <= 1e-3 * max(1.0, float(stock["pooled"].abs().max()))
