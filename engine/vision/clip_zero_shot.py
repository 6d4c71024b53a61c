"""open_clip zero-shot scoring: which text fits an image crop best.

Used for CLIF's concept cut-out ("a photo of a <class word>" decides which SAM segment is the
concept) and its region labelling (each region gets the best word of a vocabulary).

Weights come only from the user's files (ComfyUI's `models/clip_vision` folder): the open_clip
model is built with `create_model(name, pretrained=None)` and the state dict is loaded from the file;
nothing is ever downloaded. The architecture name is detected from the tensor shapes (or chosen);
the pretrained tag only selects details that are not in the weights (QuickGELU for OpenAI's
weights, normalisation constants).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import host
from ..errors import UnconfusedError

NODE_LOADER = "UnconfusedCLIPScorerLoader"
NODE_LABEL = "UnconfusedCLIPRegionLabeller"
KIND = "clip_vision"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = ["a photo of a {}", "a photo of the {}", "a cropped photo of a {}"]
HINT = ("put a full open_clip checkpoint (image and text towers), e.g. open_clip_pytorch_model.bin or "
        "open_clip_model.safetensors of laion/CLIP-ViT-B-32-laion2B-s34B-b79K, into")


def _signature_of_cfg(cfg: dict) -> tuple | None:
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if not all(isinstance(v.get(k), int) for k in ("width", "layers", "patch_size")) or "hf_model_name" in t:
        return None
    if v.get("timm_model_name") or not isinstance(t.get("width", 512), int):
        return None
    return (v["width"], v["layers"], v["patch_size"], v.get("image_size", 224), t.get("width", 512),
            t.get("layers", 12), cfg["embed_dim"])


def _signature_of_sd(sd: dict[str, torch.Tensor]) -> tuple | None:
    try:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        vl = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        tw = sd["token_embedding.weight"].shape[1]
        tl = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
        embed = sd["text_projection"].shape[1]
    except KeyError:
        return None
    return (width, vl, patch, grid * patch, tw, tl, embed)


def detect_model_name(sd: dict[str, torch.Tensor], *, name: str = "checkpoint",
                      input: str = "clip_name") -> str:
    import open_clip

    sig = _signature_of_sd(sd)
    if sig is None:
        raise UnconfusedError(f"'{name}' is not an open_clip ViT checkpoint with a text tower; {HINT} models/{KIND}", input=input)
    names = sorted(open_clip.list_models(), key=lambda n: (n.endswith("-quickgelu"), len(n), n))
    for n in names:
        cfg = open_clip.get_model_config(n)
        if cfg and _signature_of_cfg(cfg) == sig and "-quickgelu" not in n:
            return n
    raise UnconfusedError(f"'{name}' has an architecture open_clip does not list (vision width {sig[0]}, {sig[1]} "
                          f"layers, patch {sig[2]}, {sig[3]}px; text width {sig[4]}); choose model_name by hand", input="model_name")


def read_state_dict(path: Path, *, input: str = "clip_name") -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnconfusedError(f"'{path.name}' could not be read ({type(e).__name__}: {str(e)[:160]}); the file may "
                              "be damaged, or an OpenAI TorchScript .pt (use the .bin/.safetensors conversion)", input=input) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UnconfusedError(f"'{path.name}' holds no state dict", input=input)
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("vision_model.") for k in sd) and not any(k.startswith("text_model.") for k in sd):
        raise UnconfusedError(f"'{path.name}' is a vision-only CLIP (ComfyUI's clip_vision format for IP-Adapter/"
                              f"unCLIP); zero-shot scoring needs the text tower too: {HINT} models/{KIND}", input=input)
    if any(k.startswith("text_model.") for k in sd):
        raise UnconfusedError(f"'{path.name}' is a Hugging Face transformers CLIP; this loader reads open_clip "
                              f"checkpoints: {HINT} models/{KIND}", input=input)
    return sd


class ClipScorer:
    """A loaded open_clip model (the UNCONFUSED_CLIP socket value)."""

    def __init__(self, model, model_name: str, *, tag: str = "", mean=OPENAI_MEAN, std=OPENAI_STD,
                 device: str = "auto", precision: str = "auto", name: str = "clip", templates=None):
        import open_clip

        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name
        self.tag = tag
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        self.image_size = size if isinstance(size, int) else int(size[0])
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.device_choice = device
        self.precision = precision
        self.name = name
        self.templates = list(templates or TEMPLATES)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ClipScorer({self.name}, {self.model_name})"

    def running(self):
        """The model on its compute device for one call (see host.running_on)."""
        return host.running_on(self.model, self.device_choice, self.precision)

    def preprocess(self, crop: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
        """[h,w,3] 0..1 -> [3,S,S] normalised: padded to a square (gray), resized bicubic."""
        x = crop.detach().float().cpu().permute(2, 0, 1)
        h, w = x.shape[1:]
        side = max(h, w, 1)
        canvas = torch.full((3, side, side), fill)
        canvas[:, (side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = x
        canvas = F.interpolate(canvas[None], size=(self.image_size, self.image_size), mode="bicubic",
                               antialias=True, align_corners=False)[0].clamp(0, 1)
        return (canvas - self.mean) / self.std

    def _text_features(self, texts: Sequence[str], dev) -> torch.Tensor:
        key = tuple(texts)
        if key not in self._text_cache:
            feats = F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(dev)).float(), dim=-1)
            self._text_cache[key] = feats.cpu()
        return self._text_cache[key].to(dev)

    def image_features(self, images: Sequence[torch.Tensor], batch: int = 32) -> torch.Tensor:
        """Unit-norm image features [len(images), D] on the CPU; images [h,w,3] in 0..1 (padded square)."""
        if not images:
            return torch.zeros(0, int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection")
                               else 0)
        with self.running() as dev:
            out = []
            for i in range(0, len(images), batch):
                host.check_cancel()
                x = torch.stack([self.preprocess(c) for c in images[i:i + batch]]).to(dev)
                out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text features [len(texts), D] on the CPU."""
        with self.running() as dev:
            return self._text_features(texts, dev).cpu()

    @property
    def scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100)) if hasattr(self.model, "logit_scale") else 100.0

    def similarities(self, crops: Sequence[torch.Tensor], texts: Sequence[str], batch: int = 32) -> torch.Tensor:
        """Cosine similarity x logit scale, [len(crops), len(texts)] (softmax over texts = zero-shot probs)."""
        if not texts:
            raise UnconfusedError("no texts to score against; give at least one word", input="vocabulary")
        if not crops:
            return torch.zeros(0, len(texts))
        return (self.image_features(crops, batch) @ self.text_features(texts).T) * self.scale

    def __call__(self, crops, texts) -> torch.Tensor:  # a Scorer for engine.vision.sam.concept_cutout
        return self.similarities(crops, texts)

    def word_scores(self, crops: Sequence[torch.Tensor], vocabulary: Sequence[str]) -> torch.Tensor:
        """Zero-shot probabilities [len(crops), len(vocabulary)], each word averaged over the templates."""
        words = [w for w in vocabulary]
        texts = [t.format(w) for w in words for t in self.templates]
        sims = self.similarities(crops, texts).view(len(crops), len(words), len(self.templates)).mean(dim=2)
        return sims.softmax(dim=1)

    # --- the R-Aug labeller the augmentation builder looks for (engine/vision/regions.py region_tools)
    def label_regions(self, crops: Sequence[torch.Tensor], vocabulary: Sequence[str]) -> list[tuple[str, float]]:
        vocab = clean_vocabulary(vocabulary)
        if not crops:
            return []
        probs = self.word_scores(crops, vocab)
        best = probs.argmax(dim=1)
        return [(vocab[int(k)], float(probs[i, k])) for i, k in enumerate(best)]


def clean_vocabulary(vocabulary, *, input: str = "vocabulary") -> list[str]:
    if isinstance(vocabulary, str):
        import re

        vocabulary = re.split(r"[,\n]+", vocabulary)
    words = []
    for w in vocabulary or []:
        w = str(w).strip()
        if w and w not in words:
            words.append(w)
    if not words:
        raise UnconfusedError("the vocabulary is empty: write the words to label regions with, e.g. "
                              "'hair, hat, necklace, jacket', separated by commas or new lines", input=input)
    return words


def load_clip(path: str | Path, *, model_name: str = "auto", pretrained_tag: str = "auto", device: str = "auto",
              precision: str = "auto", input: str = "clip_name") -> ClipScorer:
    import open_clip

    path = Path(path)
    sd = read_state_dict(path, input=input)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():  # an open_clip model config beside the weights: a custom architecture
        try:
            cfg = json.loads(sidecar.read_text())
            assert isinstance(cfg, dict) and "vision_cfg" in cfg and "text_cfg" in cfg
        except Exception:
            raise UnconfusedError(f"'{sidecar.name}' beside the weights is not an open_clip model config (JSON with "
                                  "embed_dim, vision_cfg, text_cfg); remove or fix it", input=input) from None
        from open_clip import factory

        factory._MODEL_CONFIGS[path.stem] = cfg
        if model_name == "auto":
            model_name = path.stem
    if model_name == "auto":
        model_name = detect_model_name(sd, name=path.name, input=input)
    elif model_name not in open_clip.list_models():
        raise UnconfusedError(f"open_clip knows no model '{model_name}'; pick one from the list or 'auto'", input="model_name")
    tag = pretrained_tag
    if tag == "auto":
        tag = "openai" if "openai" in path.name.lower() else ""
    cfg = open_clip.get_pretrained_cfg(model_name, tag) if tag else {}
    quick = bool(cfg.get("quick_gelu")) or tag == "openai"
    try:
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise UnconfusedError(f"'{path.name}' does not fit open_clip {model_name} ({str(e).splitlines()[-1][:160]}); "
                              "choose another model_name or 'auto'", input="model_name") from None
    missing = [k for k in missing if not k.endswith(("attn_mask",))]
    if missing:
        raise UnconfusedError(f"'{path.name}' lacks {len(missing)} tensors of open_clip {model_name} (e.g. "
                              f"{missing[0]}); it is incomplete or another model", input=input)
    host.device(device)
    return ClipScorer(model, model_name, tag=tag, mean=cfg.get("mean", OPENAI_MEAN), std=cfg.get("std", OPENAI_STD),
                      device=device, precision=precision, name=path.name)


def load_clip_by_name(name: str, **kw) -> ClipScorer:
    path = host.find_model(KIND, name, input=kw.get("input", "clip_name"),
                           what="open_clip checkpoint (image + text towers, e.g. open_clip_model.safetensors)")
    return load_clip(path, **kw)
