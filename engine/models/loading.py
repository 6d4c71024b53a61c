"""Loading users' Stable Diffusion checkpoints offline into diffusers/transformers models.

Single-file `.safetensors` / `.ckpt` checkpoints of SD 1.x, SD 2.x and SDXL (epsilon and
v-prediction) and diffusers folders. Configs ship in `configs`; the tokenizer is built
from open_clip's vocabulary. Key conversion is diffusers' own (`single_file_utils`).

The bundle's models live on the CPU between stages; a stage moves what it needs to the
device (`bundle.to(device)`) and back, so nothing holds GPU memory while ComfyUI samples.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import configs as cfg
from ..errors import UnconfusedError
from .clip_tokenizer import clip_tokenizer
from .families import SDXL, family_named

log = logging.getLogger("unconfused")

SUPPORTED = "SD 1.x, SD 2.x and SDXL base checkpoints (.safetensors or .ckpt, epsilon or v-prediction) and diffusers folders"
UNET_PREFIX = "model.diffusion_model."
PREDICTION_CHOICES = ["auto", "epsilon", "v_prediction"]


def move_module(module: torch.nn.Module, device, dtype: torch.dtype | None = None) -> None:
    """Move/cast a module with new tensors, never in place: frozen weights shared with another
    bundle (a clone's source) stay as they were."""
    prev = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        torch.nn.Module.to(module, device=device, dtype=dtype)  # (diffusers' .to only adds a warning)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(prev)


@dataclass
class ModelBundle:
    """Everything a trainer or the sampler needs, in one object (a ComfyUI socket value)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    name: str
    text_encoder_2: torch.nn.Module | None = None  # SDXL: OpenCLIP bigG with its projection
    tokenizer_2: object = None  # SDXL: the same vocabulary, padded with "!"
    source: Path | None = None
    scheduler_config: dict = field(default_factory=lambda: dict(cfg.SCHEDULER))
    added_tokens: dict[str, list[int]] = field(default_factory=dict)  # token -> token ids
    lora: dict = field(default_factory=dict)  # attached adapters, filled by trainers
    notes: list[str] = field(default_factory=list)
    _hash: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def noise_scheduler(self):
        """A fresh DDPM scheduler with the model's training schedule."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_config, prediction_type=self.prediction_type)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModelBundle":
        """Move/cast this bundle's models. Converted weights are new tensors, never changed in
        place: a clone shares its frozen weights with its source, which must stay as it was."""
        for m in (self.unet, *self.spec.encoders(self).values()):
            move_module(m, device, dtype)
        # a VAE that overflows in fp16 (diffusers' force_upcast: SDXL's) stays fp32; callers feed it
        # its own dtype (vae.dtype)
        upcast = dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        move_module(self.vae, device, torch.float32 if upcast else dtype)
        return self

    def clone(self) -> "ModelBundle":
        """A copy for a stage that changes the model, so upstream node outputs stay intact.

        The frozen base weights are shared (they are never written to); what a stage can
        train - LoRA weights and concept token rows - is copied."""
        memo = {}
        for m in (self.unet, self.vae, *self.spec.encoders(self).values()):
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                # inference tensors (made under ComfyUI's inference_mode) are copied into normal ones
                if "lora_" not in name and "new_rows" not in name and not t.is_inference():
                    memo[id(t)] = t
        with torch.inference_mode(False):
            return copy.deepcopy(self, memo)

    @property
    def base_hash(self) -> str:
        """The base model's identity by content (12 hex digits of a sha256): of the checkpoint
        file, of a diffusers folder's files, or of the frozen weights of a model without files.
        Export metadata, resumes and caches (class images, banks) are keyed by it, so two
        models never share one. Computed once per bundle (clones keep it)."""
        if self._hash is None:
            src = Path(self.source) if self.source else None
            if src is not None and src.is_file():
                self._hash = file_sha256(src)[:12]
            elif src is not None and src.is_dir():
                self._hash = folder_sha256(src)[:12]
            else:
                self._hash = weights_sha256(self)[:12]
        return self._hash

    @property
    def spec(self):
        """The family object (engine/models/families.py): what differs between SD1, SD2, SDXL."""
        from .families import family_of

        return family_of(self)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, 77], padded as the family does (and as ComfyUI does)."""
        return self.spec.tokenize(self, prompts)

    def condition(self, prompts: list[str]):
        """The UNet conditioning of prompts (a families.Conditioning: hidden states + added)."""
        return self.spec.encode(self, prompts)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """The text hidden states [B, 77, D] the UNet cross-attends to."""
        return self.condition(prompts).hidden

    def describe(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters()) / 1e6
        lines = [f"{self.name}: {self.spec.title}, {self.prediction_type}",
                 f"UNet {n:.0f}M parameters, {self.dtype}, on {self.device}"]
        if self.added_tokens:
            lines.append("added tokens: " + ", ".join(self.added_tokens))
        if self.lora:
            lines.append("LoRA: " + ", ".join(self.lora))
        return "\n".join(lines + self.notes)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: a big file is read once


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def folder_sha256(folder: Path) -> str:
    """A diffusers folder by content: every file's relative path and sha256 (hidden files,
    e.g. an interrupted write's `.partial`, are not part of the model)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def weights_sha256(bundle: "ModelBundle") -> str:
    """A model without files by the bytes of its frozen weights (trainable LoRA weights and
    concept token rows left out, so a clone in training keeps its base's identity)."""
    h = hashlib.sha256(f"{bundle.family}:{bundle.prediction_type}".encode())
    for m in (bundle.unet, *bundle.spec.encoders(bundle).values(), bundle.vae):  # every text encoder (SDXL: 2)
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if "lora_" in name or "new_rows" in name:
                continue
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- reading files safely
def read_state_dict(path: Path, *, input: str = "ckpt_name") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .ckpt/.pt file. Pickles are read with weights_only=True:
    a file that needs arbitrary code to unpickle is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise UnconfusedError(f"{path} does not exist", input=input)
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UnconfusedError(f"{path.name} is damaged or truncated (safetensors: {e}); download it again", input=input) from e
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except __import__("pickle").UnpicklingError as e:
            raise UnconfusedError(f"{path.name} contains pickled Python objects besides weights; loading it would "
                                  "run code from the file, so it is refused. Use a .safetensors version of this "
                                  "model", input=input) from e
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise UnconfusedError(f"{path.name} is damaged or truncated ({e}); download it again",
                                  input=input) from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()
                                                if not isinstance(v, (int, float, str))):
            raise UnconfusedError(f"{path.name} does not hold a state dict of tensors", input=input)
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise UnconfusedError(f"{path.name}: unknown file type '{suffix}'; {SUPPORTED} are supported",
                          input=input)


# ---------------------------------------------------------------- recognising the family
def detect_family(sd: dict[str, torch.Tensor], name: str, *,
                  input: str = "ckpt_name") -> str:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    other = None
    if has("conditioner.embedders.") or has(UNET_PREFIX + "label_emb."):
        return detect_sdxl(sd, name, input=input)
    if has("double_blocks.") or has(UNET_PREFIX + "double_blocks."):
        other = "Flux"
    elif has(UNET_PREFIX + "joint_blocks."):
        other = "SD3"
    elif has("model.diffusion_model.blocks.") or has("model.diffusion_model.transformer_blocks."):
        other = "a transformer (DiT) model"
    if other:
        raise UnconfusedError(f"{name} is a {other} checkpoint; Unconfused supports {SUPPORTED}",
                              input=input)
    key = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key not in sd:
        if has("input_blocks.") or has("down_blocks."):
            raise UnconfusedError(f"{name} holds only a UNet; choose a full checkpoint (UNet + VAE + text encoder)", input=input)
        raise UnconfusedError(f"{name} is not a Stable Diffusion checkpoint (or it is damaged); Unconfused supports "
                              f"{SUPPORTED}", input=input)
    context_dim = sd[key].shape[1]
    family = {768: "sd1", 1024: "sd2"}.get(int(context_dim))
    if family is None:
        raise UnconfusedError(f"{name} has a UNet with text width {context_dim}, which is neither SD 1.x (768) nor "
                              f"SD 2.x (1024); Unconfused supports {SUPPORTED}", input=input)
    in_ch = sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    if in_ch != 4:
        raise UnconfusedError(f"{name} is an inpainting or other {in_ch}-channel model; choose the base model of "
                              "its family", input=input)
    missing = [p for p in ("first_stage_model.", "cond_stage_model.") if not has(p)]
    if missing:
        part = " and ".join({"first_stage_model.": "the VAE", "cond_stage_model.": "the text encoder"}[p]
                            for p in missing)
        raise UnconfusedError(f"{name} has no {part}; choose a full checkpoint", input=input)
    return family


SDXL_ATTN_KEY = UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def detect_sdxl(sd: dict[str, torch.Tensor], name: str, *,
                input: str = "ckpt_name") -> str:
    """"sdxl" for an SDXL base-shaped checkpoint (SDXL 1.0 and its fine-tunes: Pony, Illustrious,
    NoobAI...); the refiner, inpainting and EDM (Playground 2.5) variants are refused."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        raise UnconfusedError(f"{name} is an SDXL refiner checkpoint (one OpenCLIP text encoder, meant to refine "
                              "another model's latents); choose an SDXL base model or one of its fine-tunes", input=input)
    if "edm_mean" in sd or "edm_vpred.sigma_max" in sd:
        raise UnconfusedError(f"{name} is an SDXL-shaped EDM model (Playground 2.5 style), whose noise schedule "
                              "Unconfused does not train; choose an epsilon or v-prediction SDXL model", input=input)
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise UnconfusedError(f"{name} is an SDXL inpainting or other {conv_in.shape[1]}-channel model; choose the "
                              "SDXL base model (or a fine-tune) it was made from", input=input)
    if conv_in is None or SDXL_ATTN_KEY not in sd:
        raise UnconfusedError(f"{name} holds no SDXL UNet; choose a full SDXL checkpoint (UNet + VAE + both text "
                              "encoders)", input=input)
    missing = [part for prefix, part in (("first_stage_model.", "the VAE"),
                                         ("conditioner.embedders.0.transformer.", "the CLIP-L text encoder"),
                                         ("conditioner.embedders.1.model.", "the OpenCLIP-bigG text encoder"))
               if not has(prefix)]
    if missing:
        raise UnconfusedError(f"{name} has no {' and '.join(missing)}; choose a full SDXL checkpoint",
                              input=input)
    if sdxl_variant(sd) is None:
        raise UnconfusedError(f"{name} is SDXL-shaped but of unknown width (UNet {conv_in.shape[0]} channels, text "
                              f"{sd[SDXL_ATTN_KEY].shape[1]} wide); Unconfused supports {SUPPORTED}",
                              input=input)
    return "sdxl"


def sdxl_variant(sd: dict[str, torch.Tensor]) -> dict | None:
    """The configs (configs.SDXL_VARIANTS) of an SDXL file, by its UNet and text widths."""
    key = (int(sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[0]), int(sd[SDXL_ATTN_KEY].shape[1]))
    return cfg.SDXL_VARIANTS.get(key)


def detect_prediction(sd: dict[str, torch.Tensor], family: str) -> str:
    """v-prediction or epsilon, by the same rules ComfyUI uses, so both load a file alike:
    a `v_pred` key, or for SD2 the spread of one norm bias that v-models have (ComfyUI's test)."""
    if "v_pred" in sd:
        return "v_prediction"
    if family == "sd2":
        bias = sd.get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if bias is not None and torch.std(bias.float(), unbiased=False) > 0.09:
            return "v_prediction"
    return "epsilon"


# ---------------------------------------------------------------- building models
def _empty(cls, config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls(**config) if isinstance(config, dict) else cls(config)


def _assign(model: torch.nn.Module, state: dict, part: str, name: str, dtype: torch.dtype) -> torch.nn.Module:
    state = {k: v.to(dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        msg = str(e).split("\n")
        raise UnconfusedError(f"{name}: the {part} does not match its family's architecture ({msg[0]} "
                              f"{' '.join(msg[1:3])[:300]}); the file is damaged or of an unsupported variant", input="ckpt_name") from e
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise UnconfusedError(f"{name}: the {part} is missing tensors {meta[:3]}", input="ckpt_name")
    return model


def text_state_for(model: torch.nn.Module, state: dict) -> dict:
    """Text-encoder keys spelled as this transformers version spells them: v4 names them
    `text_model.<...>` (the Hugging Face file format), v5 drops the `text_model.` level."""
    own = set(model.state_dict())
    wants_prefix = any(k.startswith("text_model.") for k in own)
    out = {}
    for k, v in state.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        # top-level tensors (CLIPTextModelWithProjection's text_projection) keep their own name
        out[bare if bare in own or not wants_prefix else "text_model." + bare] = v
    return out


def hf_text_keys(state: dict) -> dict:
    """Keys in the Hugging Face file format (`text_model.<...>`), whatever the transformers version."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def build_text_encoder(family: str, state: dict | None = None, dtype=torch.float32):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**cfg.TEXT_ENCODER[family]))  # small enough to build directly
    if state is not None:
        state = text_state_for(model, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise UnconfusedError(f"text encoder keys do not match {family}: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}", input="ckpt_name")
    return model.to(dtype).eval()


def load_single_file(path: str | os.PathLike, *, prediction: str = "auto", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load an original (LDM key) SD 1.x / 2.x checkpoint into diffusers models, offline."""
    path = Path(path)
    sd = read_state_dict(path)
    return bundle_from_ldm_state_dict(sd, path.name, prediction=prediction, dtype=dtype, source=path)
def bundle_from_ldm_state_dict(sd: dict[str, torch.Tensor], name: str, *, prediction: str = "auto",
                               dtype: torch.dtype = torch.float32,
                               source: Path | None = None) -> ModelBundle:
    """A bundle from a whole-checkpoint state dict in LDM keys (a file's, or ComfyUI's models'
    as a checkpoint saver would write them). `sd` is consumed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    family = detect_family(sd, name)
    detected = detect_prediction(sd, family)
    pred = detected if prediction == "auto" else prediction
    if pred not in ("epsilon", "v_prediction"):
        raise UnconfusedError(f"unknown prediction type {prediction!r}; use {PREDICTION_CHOICES}",
                              input="prediction")

    if family == "sdxl":
        return _sdxl_bundle(sd, name, pred, detected, prediction, dtype, source)
    unet_cfg = dict(cfg.UNET[family])
    if family == "sd2" and pred == "v_prediction":
        unet_cfg.update(sample_size=96, upcast_attention=True)  # SD 2.x 768-v
    unet = _assign(_empty(UNet2DConditionModel, unet_cfg), sfu.convert_ldm_unet_checkpoint(sd, unet_cfg),
                   "UNet", name, dtype)
    vae = _assign(_empty(AutoencoderKL, cfg.VAE), sfu.convert_ldm_vae_checkpoint(sd, cfg.VAE), "VAE", name,
                  torch.float32 if dtype == torch.float16 else dtype)  # fp16 VAEs overflow to NaN

    if family == "sd1":
        te_state = sfu.convert_ldm_clip_checkpoint(sd)
        text_encoder = build_text_encoder("sd1", te_state, dtype)
    else:
        text_encoder = build_text_encoder("sd2", None, dtype)
        te_state = sfu.convert_open_clip_checkpoint(text_encoder, sd)
        te_state = {k: v for k, v in te_state.items() if k != "text_projection.weight"}
        text_encoder = build_text_encoder("sd2", te_state, dtype)
    del sd

    bundle = ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder,
                         tokenizer=clip_tokenizer(pad=family_named(family).tokenizer_pad), family=family,
                         prediction_type=pred, name=name, source=source)
    if prediction != "auto" and pred != detected:
        bundle.notes.append(f"prediction type set to {pred} (the file looks like {detected})")
    _freeze(bundle)
    return bundle


def _sdxl_bundle(sd, name, pred, detected, prediction, dtype, source) -> ModelBundle:
    """SDXL from LDM keys: UNet (`label_emb` -> `add_embedding`) and VAE by diffusers' converters,
    CLIP-L from `conditioner.embedders.0.transformer.` (Hugging Face keys already), bigG from
    `conditioner.embedders.1.model.` (OpenCLIP keys, fused qkv split, `text_projection` transposed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    variant = sdxl_variant(sd)
    unet = _assign(_empty(UNet2DConditionModel, variant["unet"]),
                   sfu.convert_ldm_unet_checkpoint(sd, variant["unet"]), "UNet", name, dtype)
    vae = _assign(_empty(AutoencoderKL, variant["vae"]), sfu.convert_ldm_vae_checkpoint(sd, variant["vae"]), "VAE",
                  name, torch.float32 if dtype == torch.float16 else dtype)  # SDXL's VAE overflows in fp16
    te1 = _empty(CLIPTextModel, CLIPTextConfig(**variant["te"]))
    te1_state = sfu.convert_ldm_clip_checkpoint({k: v for k, v in sd.items()
                                                 if k.startswith("conditioner.embedders.0.transformer.")})
    te1 = _assign(te1, text_state_for(te1, _no_position_ids(te1_state)), "CLIP-L text encoder", name, dtype)
    te2 = _empty(CLIPTextModelWithProjection, CLIPTextConfig(**variant["te2"]))
    te2_state = sfu.convert_open_clip_checkpoint(te2, sd, prefix="conditioner.embedders.1.model.")
    te2 = _assign(te2, text_state_for(te2, _no_position_ids(te2_state)), "OpenCLIP-bigG text encoder", name,
                  dtype)
    del sd
    bundle = ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=te1.eval(),
                         tokenizer=clip_tokenizer(pad=SDXL.tokenizer_pad), family="sdxl",
                         prediction_type=pred, name=name, source=source, text_encoder_2=te2.eval(),
                         tokenizer_2=clip_tokenizer(pad=SDXL.tokenizer_2_pad))
    if prediction != "auto" and pred != detected:
        bundle.notes.append(f"prediction type set to {pred} (the file looks like {detected})")
    _freeze(bundle)
    return bundle


def _no_position_ids(state: dict) -> dict:
    """Without the `position_ids` buffer some files hold (transformers keeps it out of state dicts)."""
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def load_diffusers_folder(folder: str | os.PathLike, *, prediction: str = "auto",
                          dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a diffusers-format model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    unet_json = folder / "unet" / "config.json"
    if (folder / "text_encoder_2" / "config.json").is_file() or (
            unet_json.is_file() and json.loads(unet_json.read_text()).get("addition_embed_type") == "text_time"):
        return _load_sdxl_folder(folder, prediction=prediction, dtype=dtype)
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise UnconfusedError(f"{folder.name} is not a diffusers SD folder: {sub}/config.json is missing", input="ckpt_name")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True,
                                            torch_dtype=torch.float32 if dtype == torch.float16 else dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                     torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UnconfusedError(f"{folder.name}: cannot load the diffusers folder ({e})",
                              input="ckpt_name") from e
    width = unet.config.cross_attention_dim
    # SD1/SD2 by text width; a narrower SD-shaped model (the demo model) counts as SD1-like
    family = "sd2" if width == 1024 else "sd1"
    if width != text_encoder.config.hidden_size or unet.config.in_channels != 4:
        raise UnconfusedError(f"{folder.name} is not an SD 1.x/2.x base model (text width {width}, "
                              f"{unet.config.in_channels} input channels); Unconfused supports {SUPPORTED}", input="ckpt_name")
    scheduler_config, detected = _folder_scheduler(folder)
    if (folder / "tokenizer" / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    else:
        tokenizer = clip_tokenizer(pad=family_named(family).tokenizer_pad)
    bundle = ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                         family=family, prediction_type=detected if prediction == "auto" else prediction,
                         name=folder.name, source=folder, scheduler_config=scheduler_config)
    _freeze(bundle)
    return bundle


def _load_sdxl_folder(folder: Path, *, prediction: str, dtype: torch.dtype) -> ModelBundle:
    """An SDXL diffusers folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer(_2)/, scheduler/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / sub / "config.json").is_file():
            raise UnconfusedError(f"{folder.name} is not a diffusers SDXL folder: {sub}/config.json is missing "
                                  "(an SDXL refiner has no text_encoder; choose an SDXL base model)",
                                  input="ckpt_name")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True,
                                            torch_dtype=torch.float32 if dtype == torch.float16 else dtype)
        te1 = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, torch_dtype=dtype)
        te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True,
                                                          torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UnconfusedError(f"{folder.name}: cannot load the diffusers SDXL folder ({e})",
                              input="ckpt_name") from e
    if unet.config.in_channels != 4:
        raise UnconfusedError(f"{folder.name} is an SDXL inpainting or other {unet.config.in_channels}-channel "
                              "model; choose the SDXL base model (or a fine-tune)", input="ckpt_name")
    width = te1.config.hidden_size + te2.config.hidden_size
    if unet.config.cross_attention_dim != width:
        raise UnconfusedError(f"{folder.name}: the UNet's text width ({unet.config.cross_attention_dim}) is not the "
                              f"two text encoders' ({width}); the folder mixes models", input="ckpt_name")
    scheduler_config, detected = _folder_scheduler(folder)
    toks = []
    for sub, pad in (("tokenizer", SDXL.tokenizer_pad), ("tokenizer_2", SDXL.tokenizer_2_pad)):
        toks.append(CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True)
                    if (folder / sub / "vocab.json").is_file() else clip_tokenizer(pad=pad))
    bundle = ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=te1.eval(), tokenizer=toks[0],
                         family="sdxl", prediction_type=detected if prediction == "auto" else prediction,
                         name=folder.name, source=folder, scheduler_config=scheduler_config,
                         text_encoder_2=te2.eval(), tokenizer_2=toks[1])
    _freeze(bundle)
    return bundle


def _folder_scheduler(folder: Path) -> tuple[dict, str]:
    """The training schedule and prediction type of a diffusers folder (scheduler/scheduler_config.json)."""
    scheduler_config = dict(cfg.SCHEDULER)
    detected = "epsilon"
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        sc = json.loads(sched_file.read_text())
        detected = sc.get("prediction_type", "epsilon")
        scheduler_config.update({k: sc[k] for k in scheduler_config if k in sc})
    return scheduler_config, detected


def _freeze(bundle: ModelBundle) -> None:
    for m in (bundle.unet, bundle.vae, *bundle.spec.encoders(bundle).values()):
        m.requires_grad_(False)


def load_model(path: str | os.PathLike, **kwargs) -> ModelBundle:
    """A checkpoint file or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, **kwargs)
    return load_single_file(path, **kwargs)


def bundle_from_parts(unet, vae, text_encoder, *, family: str = "sd1", prediction_type: str = "epsilon",
                      name: str = "in-memory model", tokenizer=None, text_encoder_2=None,
                      tokenizer_2=None) -> ModelBundle:
    """A bundle from models already in memory (tests, the built-in demo model, notebooks).
    SDXL takes `text_encoder_2` (a CLIPTextModelWithProjection) too."""
    if text_encoder_2 is not None and tokenizer_2 is None:
        tokenizer_2 = clip_tokenizer(pad=SDXL.tokenizer_2_pad)
    bundle = ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                         tokenizer=tokenizer or clip_tokenizer(pad=family_named(family).tokenizer_pad), family=family,
                         prediction_type=prediction_type, name=name,
                         text_encoder_2=None if text_encoder_2 is None else text_encoder_2.eval(),
                         tokenizer_2=tokenizer_2)
    _freeze(bundle)
    return bundle


def add_text_encoder_lora(text_encoder: torch.nn.Module, config, adapter_name: str = "default") -> torch.nn.Module:
    """peft LoRA layers on a transformers text encoder, through peft itself. transformers'
    `add_adapter` only wraps this call, but refuses any peft older than the one it was released
    with (transformers 5.24 wants peft >= 0.22, which may not be installable yet); the layers,
    their state dict and the kohya export are peft's either way. Like `add_adapter`, everything
    but the LoRA weights is frozen afterwards."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
    configs = dict(text_encoder.__dict__.get("peft_config") or {})
    configs[adapter_name] = config
    text_encoder.peft_config = configs
    text_encoder._hf_peft_config_loaded = True
    return text_encoder
