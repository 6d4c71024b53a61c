"""CLIF's frozen CLIP image tower, its text projection, and the on-disk image-feature cache.

CLIF (paper 4.2) scores captions against images in CLIP's joint space: image features from a
frozen CLIP image tower, text features from the diffusion model's own (fine-tuned) text
encoder. The tower must be the CLIP the text encoder came from - OpenAI ViT-L/14 for SD 1.x,
OpenCLIP ViT-H/14 for SD 2.x - so the two sides meet in one space.

Loading: only the user's own files, offline. A full open_clip checkpoint (image + text towers,
e.g. `open_clip_model.safetensors` of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, or OpenAI's
ViT-L/14 in open_clip form) in `models/clip_vision` (or `models/clip`) is read by the CLIP
Scorer Loader's code (`clip_zero_shot.load_clip`: `create_model(arch, pretrained=None)`, the
architecture detected from tensor shapes, an optional JSON config sidecar for custom
architectures); a loaded CLIP Scorer can be passed in directly too.

Text projection: SD checkpoints do not carry CLIP's `text_projection` (SD 1.x's text encoder is
CLIP ViT-L/14's text tower without it; SD 2.x's is ViT-H/14's, cut at the penultimate layer).
CLIF uses the full CLIP, so the projection is taken - frozen - from the same open_clip
checkpoint as the image tower: text feature = normalize(pooled(SD text encoder) @ W_text).
For SD 1.x this is exactly CLIP ViT-L/14's text feature of the prompt (before any training);
for SD 2.x the pooled output comes from layer 23 of 24 (+ the final norm), as SD 2.x runs the
encoder - an approximation of CLIP's own text feature that training adapts to.
That is why a vision-only file (ComfyUI's IP-Adapter `clip_vision` format) is refused: it has
no text projection and no logit scale.

Feature cache: the tower is frozen, so every dataset image is encoded once and its normalised
feature stored under `output/unconfused/clip_features/<tower hash>/` keyed by the sha256 of the
image file's bytes. Shards (`shard_<n>.safetensors`, up to 1024 features each) are written
atomically as encoding goes, so Cancel loses nothing and another dataset with the same images
reuses them. The reference design re-encodes images every step; `benchmarks/clif_cache.py`
measures the difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import host
from ..errors import UnconfusedError
from ..files import atomic_save_safetensors

KINDS = ("clip_vision", "clip")
SHARD = 1024
HINT = ("an open_clip checkpoint with both towers: OpenAI ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 "
        "(laion2B-s32B-b79K) for SD 2.x, e.g. open_clip_model.safetensors")


class ImageTower:
    """A frozen CLIP image tower + the matching text projection and logit scale."""

    def __init__(self, visual: torch.nn.Module, text_projection: torch.Tensor, logit_scale: float, *,
                 image_size: int, mean, std, name: str, model_name: str):
        self.visual = visual.eval().requires_grad_(False)
        with torch.inference_mode(False):  # a normal tensor even when loaded inside ComfyUI's inference mode
            self.text_projection = text_projection.detach().float().clone()  # [text width, embed dim]
        self.logit_scale = float(logit_scale)
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.name = name
        self.model_name = model_name
        self._hash: str | None = None

    def __repr__(self) -> str:
        return f"ImageTower({self.name}, {self.model_name}, embed {self.embed_dim})"

    @property
    def text_width(self) -> int:
        return int(self.text_projection.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.text_projection.shape[1])

    @property
    def tower_hash(self) -> str:
        """sha256 of every weight of the tower and projection plus the preprocessing (16 hex):
        the cache folder, so features of another tower (or other weights) are never mixed in."""
        if self._hash is None:
            h = hashlib.sha256(f"{self.image_size}:{self.mean.tolist()}:{self.std.tolist()}:pad-square".encode())
            for k, v in sorted(self.visual.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            h.update(self.text_projection.numpy().tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash

    def parameters(self):
        yield from self.visual.parameters()

    def preprocess(self, img: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
        """[H,W,3] 0..1 -> [3,S,S] normalised: padded to a square (gray) so nothing at the edges of a
        side-by-side pair is cropped away, then resized (bicubic, antialiased)."""
        x = img.detach().float().cpu().permute(2, 0, 1)
        h, w = x.shape[1:]
        side = max(h, w, 1)
        if h != w:
            canvas = torch.full((3, side, side), fill)
            canvas[:, (side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = x
            x = canvas
        if side != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode(self, images: Sequence[torch.Tensor], *, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32, batch: int = 32) -> torch.Tensor:
        """Normalised image features [N, E] (float32, on the CPU). The tower must be on `device`."""
        device = device or next(self.visual.parameters()).device
        out = []
        for i in range(0, len(images), batch):
            x = torch.stack([self.preprocess(im) for im in images[i:i + batch]]).to(device)
            ctx = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
                else contextlib.nullcontext()
            with ctx:
                f = self.visual(x)
            if isinstance(f, tuple):  # towers that also return tokens
                f = f[0]
            out.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def to(self, device, dtype: torch.dtype | None = None) -> "ImageTower":
        self.visual.to(device=device, dtype=dtype)
        return self


def tower_from_scorer(scorer, *, input: str = "clip_model") -> ImageTower:
    """The image tower of a loaded CLIP Scorer (`engine.vision.clip_zero_shot.ClipScorer`)."""
    model = scorer.model
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        if proj.bias is not None and bool(proj.bias.abs().max() > 0):
            raise UnconfusedError(f"{scorer.name}: a text projection with a bias is not supported; use {HINT}", input=input)
        proj = proj.weight.T
    if not isinstance(proj, torch.Tensor) or getattr(model, "visual", None) is None:
        raise UnconfusedError(f"{scorer.name} has no CLIP text projection or image tower (it is not a two-tower "
                              f"open_clip CLIP); CLIF needs {HINT}", input=input)
    ls = getattr(model, "logit_scale", None)
    scale = float(ls.detach().exp().clamp(max=100)) if isinstance(ls, torch.Tensor) else 100.0
    return ImageTower(model.visual, proj, scale, image_size=scorer.image_size, mean=scorer.mean.flatten().tolist(),
                      std=scorer.std.flatten().tolist(), name=scorer.name, model_name=scorer.model_name)


def list_towers() -> list[str]:
    """Files of models/clip_vision and models/clip (open_clip checkpoints for CLIF)."""
    names = []
    for kind in KINDS:
        names += [n for n in host.list_models(kind) if n not in names]
    return names


def load_image_tower(name: str, *, model_name: str = "auto", pretrained_tag: str = "auto", input: str = "image_tower") -> ImageTower:
    """An image tower from a file name of models/clip_vision (or models/clip), or a full path."""
    from .clip_zero_shot import load_clip

    path = Path(name)
    if not path.is_absolute():
        path = None
        for kind in KINDS:
            with contextlib.suppress(UnconfusedError):
                path = host.find_model(kind, name, input=input, what=HINT)
                break
        if path is None:
            host.find_model(KINDS[0], name, input=input, what=HINT)  # raises with the fix
    elif not path.is_file():
        raise UnconfusedError(f"{path} does not exist; put {HINT} into models/clip_vision", input=input)
    scorer = load_clip(path, model_name=model_name, pretrained_tag=pretrained_tag, device="cpu",
                       input=input)
    return tower_from_scorer(scorer, input=input)


def check_pair(tower: ImageTower, text_width: int, family: str, *,
               input: str = "image_tower") -> None:
    """The tower's text projection must fit the SD text encoder's width (768 SD1, 1024 SD2)."""
    if tower.text_width != text_width:
        from ..models.families import FAMILIES

        want = {name: f.clif_tower[2] for name, f in FAMILIES.items()}
        raise UnconfusedError(f"{tower.name} ({tower.model_name}) has a text width of {tower.text_width}, but the "
                              f"model's text encoder has {text_width}: they are not the same CLIP. Choose "
                              f"{want.get(family, 'the CLIP the text encoder comes from')}", input=input)


# ---------------------------------------------------------------- the feature cache
def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:32]


class FeatureCache:
    """Normalised image features on disk, keyed by image content, one folder per tower."""

    def __init__(self, tower: ImageTower, root: Path | None = None):
        self.tower = tower
        self.folder = Path(root or host.output_dir() / "unconfused" / "clip_features") / tower.tower_hash
        self._mem: dict[str, torch.Tensor] = {}
        self._loaded = False

    def _load(self) -> None:
        from safetensors.torch import load_file

        if self._loaded:
            return
        for shard in sorted(self.folder.glob("shard_*.safetensors")):
            try:
                self._mem.update(load_file(str(shard)))
            except Exception:  # a damaged shard: its features are simply encoded again
                shard.unlink(missing_ok=True)
        self._loaded = True

    def __len__(self) -> int:
        self._load()
        return len(self._mem)

    def features(self, keys: list[str], load: Callable[[int], torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype = torch.float32, batch: int = 32, write: bool = True,
                 desc: str = "encoding images (CLIP)") -> torch.Tensor:
        """Features [len(keys), E] for content keys; `load(i)` gives image i ([H,W,3]) when missing.
        Missing ones are encoded in batches and saved shard by shard (Cancel keeps what is done)."""
        self._load()
        missing = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in self._mem]
        order = list(dict.fromkeys(keys))
        todo = [order[i] for i in missing]
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            bar = host.progress(len(todo), desc)
            self.tower.to(device)
            try:
                pending: dict[str, torch.Tensor] = {}
                for j in range(0, len(todo), batch):
                    chunk = todo[j:j + batch]
                    feats = self.tower.encode([load(first[k]) for k in chunk], device=device, dtype=dtype,
                                              batch=batch)
                    for k, f in zip(chunk, feats):
                        self._mem[k] = f.contiguous()
                        pending[k] = self._mem[k]
                    if write and len(pending) >= SHARD:
                        self._write(pending)
                        pending = {}
                    bar.update(len(chunk))  # raises on Cancel: the finally below keeps what is done
            finally:
                if write and pending:
                    self._write(pending)
                bar.close()
                self.tower.to("cpu")
        return torch.stack([self._mem[k] for k in keys])

    def _write(self, feats: dict[str, torch.Tensor]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors(self.folder / f"shard_{uuid.uuid4().hex[:12]}.safetensors",
                                    {k: v.float().cpu().contiguous() for k, v in feats.items()},
                                    {"format": "unconfused.clip_features/1", "tower": self.tower.tower_hash})
        except OSError as e:  # the cache is an optimisation: training goes on from memory
            host.log.warning("could not write the CLIP feature cache to %s (%s)", self.folder, e)
