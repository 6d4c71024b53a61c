"""A toy world small enough to learn on a CPU: coloured shapes on plain grounds, with captions
and exact masks, and the miniature SD 1.x-shaped model trained on it (trainers/toyworld.py).

The world is a pure function of (seed, index): objects drawn from shapes x colours x patterns
x sizes, 1-3 per scene at non-overlapping positions, on one of a few grounds, captioned by a
small grammar ("a red striped ball next to a small blue box on grass"). A few (colour, pattern,
shape) combinations never occur in the training world: they are the "personal concepts" of the
confusion experiment (benchmarks/toy_confusion.py), unseen by the base model.

The trained model lives in `engine/evaluation/toyworld_weights/`: a diffusers folder (`toy-sd/`) that the
pack loads as an ordinary SD 1.x model, and an open_clip checkpoint (`toy-clip.safetensors` +
its config sidecar) whose text tower is the SD text encoder, for CLIF and the metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SIZE = 64  # pixels; the VAE downsamples 8x as SD does (the sampler assumes 8)
SHAPES = ("ball", "box", "pyramid", "ring")
COLOURS = {"red": (0.86, 0.1, 0.1), "green": (0.1, 0.62, 0.15), "blue": (0.12, 0.25, 0.9),
           "yellow": (0.96, 0.84, 0.1), "purple": (0.55, 0.15, 0.72), "orange": (1.0, 0.5, 0.05)}
PATTERNS = ("plain", "striped")
SIZES = {"small": (6.5, 9.0), "big": (11.0, 14.5)}  # half-extent in pixels
GROUNDS = {"grass": (0.62, 0.78, 0.5), "sand": (0.88, 0.8, 0.63), "snow": (0.93, 0.94, 0.97)}
# never in the training world: the confusion experiment's personal concepts (two of one class)
HELD_OUT = (("purple", "striped", "ball"), ("orange", "striped", "ball"), ("yellow", "striped", "box"))
COUNTS = (1, 2, 3)
COUNT_WEIGHTS = (0.4, 0.45, 0.15)
WEIGHTS_DIR = Path(__file__).resolve().parent / "toyworld_weights"
MODEL_DIR = WEIGHTS_DIR / "toy-sd"
CLIP_NAME = "toy-clip"
CLIP_PATH = WEIGHTS_DIR / f"{CLIP_NAME}.safetensors"


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    pattern: str
    size: str
    x: float  # centre, pixels
    y: float
    r: float  # half-extent, pixels

    @property
    def concept(self) -> tuple[str, str, str]:
        return (self.colour, self.pattern, self.shape)

    def phrase(self, with_size: bool = False) -> str:
        words = ([self.size] if with_size else []) + [self.colour] + (["striped"] if self.pattern == "striped" else [])
        return " ".join(words + [self.shape])


@dataclass
class Scene:
    objects: list[Obj]
    ground: str
    caption: str = ""
    masks: list[np.ndarray] = field(default_factory=list)  # bool [SIZE, SIZE] per object
    image: np.ndarray | None = None  # uint8 [SIZE, SIZE, 3]


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(objects: list[Obj], ground: str | None, rng: random.Random | None = None) -> str:
    """The grammar: objects left to right, joined by 'and' / 'next to', then the ground."""
    rng = rng or random.Random(0)
    objs = sorted(objects, key=lambda o: o.x)
    parts = [article(o.phrase(with_size=rng.random() < 0.5)) for o in objs]
    if len(parts) == 1:
        text = parts[0]
    elif len(parts) == 2:
        text = f"{parts[0]} {rng.choice(['and', 'next to'])} {parts[1]}"
    else:
        text = f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"{text} on {ground}" if ground else text


def shape_mask(shape: str, x: float, y: float, r: float, size: int = SIZE) -> np.ndarray:
    """Exact boolean mask of one object (pixel centres inside the shape)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - x, yy - y
    if shape == "ball":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "box":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "pyramid":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.58)
    if shape == "ring":
        d = dx ** 2 + dy ** 2
        return (d <= r ** 2) & (d >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def paint(objects: list[Obj], ground: str, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 picture and exact per-object masks (objects never overlap)."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = GROUNDS[ground]
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy) // 3) % 2 == 0
    masks = []
    for o in objects:
        m = shape_mask(o.shape, o.x, o.y, o.r, size)
        col = np.array(COLOURS[o.colour], np.float32)
        img[m] = col
        if o.pattern == "striped":
            img[m & stripes] = 0.35 * col + 0.65  # pale stripes of the same hue
        masks.append(m)
    return (img * 255).round().astype(np.uint8), masks


def place(rng: random.Random, specs: list[tuple[str, str, str, str]], size: int = SIZE) -> list[Obj]:
    """Non-overlapping positions for (shape, colour, pattern, size) specs."""
    for _ in range(200):
        out = []
        for shape, colour, pattern, sz in specs:
            r = rng.uniform(*SIZES[sz])
            x, y = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
            out.append(Obj(shape, colour, pattern, sz, x, y, r))
        if all((a.x - b.x) ** 2 + (a.y - b.y) ** 2 > (a.r + b.r + 3) ** 2 for i, a in enumerate(out)
               for b in out[i + 1:]):
            return out
    # crowded: fall back to small objects in a row (always fits for <= 3 objects)
    return [Obj(s, c, p, "small", (i + 0.5) * size / len(specs), size / 2, 7.0) for i, (s, c, p, _) in enumerate(specs)]


def random_spec(rng: random.Random, *, allow_held_out: bool = False) -> tuple[str, str, str, str]:
    while True:
        shape, colour, pattern = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(PATTERNS)
        if allow_held_out or (colour, pattern, shape) not in HELD_OUT:
            return shape, colour, pattern, rng.choice(list(SIZES))


def scene(seed: int, index: int) -> Scene:
    """Training scene number `index` of the world `seed` (a pure function of both)."""
    rng = random.Random(seed * 1_000_003 + index)
    n = rng.choices(COUNTS, COUNT_WEIGHTS)[0]
    objs = place(rng, [random_spec(rng) for _ in range(n)])
    ground = rng.choice(list(GROUNDS))
    img, masks = paint(objs, ground)
    return Scene(objs, ground, describe(objs, ground, rng), masks, img)


def concept_photos(concept: tuple[str, str, str], n: int, seed: int = 0) -> list[Scene]:
    """`n` "photos" of one object (a personal concept): alone, varied size, place and ground."""
    colour, pattern, shape = concept
    rng = random.Random(f"photo:{seed}:{colour}:{pattern}:{shape}")
    out = []
    for i in range(n):
        objs = place(rng, [(shape, colour, pattern, "big" if i % 2 == 0 else "small")])
        ground = list(GROUNDS)[i % len(GROUNDS)]
        img, masks = paint(objs, ground)
        out.append(Scene(objs, ground, describe(objs, ground, rng), masks, img))
    return out


def batch(seed: int, start: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes start..start+n as float images [n,3,S,S] in 0..1 and their captions."""
    scenes = [scene(seed, i) for i in range(start, start + n)]
    imgs = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return imgs, [s.caption for s in scenes]


# ---------------------------------------------------------------- the miniature model
TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64, layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
UNET = dict(sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=[64, 128], down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 32, 64, 64], layers_per_block=1,
           latent_channels=4, norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0)
CLIP_CFG = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": SIZE, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT["hidden_size"],
                 "heads": TEXT["num_attention_heads"], "layers": TEXT["num_hidden_layers"],
                 "mlp_ratio": TEXT["intermediate_size"] / TEXT["hidden_size"]},
}


def build_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TEXT))


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET)


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE)


def build_clip(seed: int = 0):
    """The open_clip model (both towers) of the toy CLIP, random."""
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS[CLIP_NAME] = CLIP_CFG
    torch.manual_seed(seed)
    return open_clip.create_model(CLIP_NAME, pretrained=None)


def open_clip_text_state(text_encoder) -> dict[str, torch.Tensor]:
    """The transformers CLIPTextModel's weights in open_clip's text-tower keys (same maths:
    causal pre-norm transformer, QuickGELU, final norm), so the open_clip file's text tower is
    the SD text encoder itself."""
    from ..models.loading import hf_text_keys

    sd = {k.removeprefix("text_model."): v for k, v in hf_text_keys(text_encoder.state_dict()).items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    for i in range(TEXT["num_hidden_layers"]):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[b + "attn.in_proj_weight"] = torch.cat([sd[a + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[b + "attn.in_proj_bias"] = torch.cat([sd[a + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        for src, dst in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[b + dst + ".weight"] = sd[a + src + ".weight"]
            out[b + dst + ".bias"] = sd[a + src + ".bias"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def is_trained(folder: Path = WEIGHTS_DIR) -> bool:
    return (Path(folder) / "toy-sd" / "model_index.json").is_file() and (Path(folder) / f"{CLIP_NAME}.json").is_file()


def load_toy_bundle(folder: str | Path | None = None):
    """The trained toy model as an ordinary SD 1.x bundle (through the pack's own loader)."""
    from ..errors import UnconfusedError
    from ..models.loading import load_diffusers_folder

    folder = Path(folder) if folder else MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise UnconfusedError(f"the toy model is not at {folder}; train it with `python -m unconfused toyworld "
                              "train` (or check out the committed weights)", input="ckpt")
    return load_diffusers_folder(folder)


def load_toy_clip(path: str | Path | None = None):
    """The toy CLIP as the pack's CLIP Scorer (image tower + the SD text encoder as text tower)."""
    from ..vision.clip_zero_shot import load_clip

    return load_clip(Path(path) if path else CLIP_PATH, device="cpu")


def toy_concepts(names: list[str] | None = None, n_photos: int = 5, seed: int = 0) -> dict[str, list[Scene]]:
    """Photos of the held-out personal concepts, keyed by 'colour pattern shape' (for a demo or a
    benchmark: `scene.image`, `scene.masks[0]`, the class word is the shape)."""
    concepts = [c for c in HELD_OUT if names is None or " ".join(c) in names]
    return {" ".join(c): concept_photos(c, n_photos, seed) for c in concepts}


DEMO_TOKENS = {"<a-ball>": HELD_OUT[0], "<b-ball>": HELD_OUT[1]}  # two of one class: they can confuse
# The demo's prompts name a ground: the model learnt every picture with one, and the concepts' photos
# teach nothing about it (the LoRA's loss counts inside their masks only), so without one the
# ground of a two-concept picture comes out as a purple-pink haze.
DEMO_GROUND = "snow"


def demo_concepts(n_photos: int = 5, seed: int = 0) -> list[tuple[str, str, list[torch.Tensor], list[torch.Tensor]]]:
    """(token, class word, images [H,W,3] 0..1, exact masks [H,W]) of the two personal concepts the
    demo and the benchmark train: a purple striped ball and an orange striped ball."""
    out = []
    for token, concept in DEMO_TOKENS.items():
        scenes = concept_photos(concept, n_photos, seed)
        out.append((token, concept[2], [torch.from_numpy(s.image).float() / 255 for s in scenes],
                    [torch.from_numpy(s.masks[0]).float() for s in scenes]))
    return out


def write_toy_bank(folder: str | Path, per_label: int = 3, seed: int = 0) -> Path:
    """A common-concept bank of the world's own objects (known ones only), one subfolder per shape,
    exact masks in `<label>/masks/` (the layout `augment.bank_from_folder` reads)."""
    from PIL import Image

    from ..files import atomic_save_image

    folder = Path(folder)
    rng = random.Random(f"bank:{seed}")
    for shape in SHAPES:
        for i in range(per_label):
            path = folder / shape / f"{i:03d}.png"
            while True:
                colour, pattern = rng.choice(list(COLOURS)), rng.choice(PATTERNS)
                if (colour, pattern, shape) not in HELD_OUT:
                    break
            objs = place(rng, [(shape, colour, pattern, "big")])
            if path.is_file():  # (after the draws: a rerun after an interruption makes the same bank)
                continue
            img, masks = paint(objs, "snow")
            atomic_save_image(folder / shape / "masks" / f"{i:03d}.png",
                              Image.fromarray(masks[0].astype(np.uint8) * 255, "L"))
            atomic_save_image(path, Image.fromarray(img))
    return folder


# ---------------------------------------------------------------- training and measuring in the toy world
# Settings that suit the toy model (64 px, a 4 M UNet): the demo's built-in run and
# benchmarks/toy_confusion.py use the same ones.
SAMPLING = {"steps": 20, "cfg": 4.0, "scheduler": "ddim", "negative": ""}  # the world has no negative words
AUGMENT = {"canvas": SIZE, "global_pairs": 48, "region_pairs": 0, "mix_per_pair": 24, "min_scale": 0.35,
           "max_scale": 0.6}
CLIF = {"steps": 60, "batch_size": 16, "learning_rate": 5e-4, "token_lr": 5e-3, "rank": 4, "alpha": 4.0,
        "warmup_steps": 0, "checkpoint_every": 0, "holdout": 0.1}
LORA = {"steps": 150, "resolution": SIZE, "rank": 4, "alpha": 4.0, "unet_lr": 1e-3, "token_lr": 5e-3,
        "batch_size": 2, "checkpoint_every": 0, "flip": False}


def draw(bundle, prompts: list[str], seeds: list[int], steps: int = SAMPLING["steps"],
         cfg: float = SAMPLING["cfg"]) -> torch.Tensor:
    """Pictures [B,64,64,3] in 0..1 as the toy model was trained to draw them (DDIM, no negative)."""
    from ..models.sampling import generate

    return generate(bundle, prompts, steps=steps, cfg=cfg, width=SIZE, height=SIZE, seeds=seeds,
                    scheduler=SAMPLING["scheduler"], negative=SAMPLING["negative"], desc="toy world")


def pair_prompt(tokens: dict[str, tuple[str, str, str]], ground: str | None = None) -> str:
    """'a photo of <a-ball> ball and <b-ball> ball [on snow]': each token with its class word (the shape)."""
    return "a photo of " + " and ".join(f"{t} {c[2]}" for t, c in tokens.items()) + (f" on {ground}" if ground else "")


def measure_concepts(bundle, oracle, tokens: dict[str, tuple[str, str, str]], n: int, seed: int = 0,
                     steps: int = SAMPLING["steps"], cfg: float = SAMPLING["cfg"], ground: str | None = None
                     ) -> tuple[dict, torch.Tensor]:
    """The oracle's measures of two concept tokens (token -> (colour, pattern, shape)): `n` pictures
    of the pair prompt (presence of each, both, confusion degree, leakage; strict and by colour
    alone, since the model draws colours better than outlines) and `n` of each concept alone
    (fidelity); `ground`: the prompts end "on <ground>". Returns the measures and the pair pictures (for the pack's own metrics)."""
    from . import oracle as O

    a, b = tokens.values()
    seeds = [1000 * seed + i for i in range(n)]
    where = f" on {ground}" if ground else ""
    pictures = draw(bundle, [pair_prompt(tokens, ground)] * n, seeds, steps, cfg)
    dets = oracle.detect(pictures)
    rep = O.pair_report(dets, a, b)
    rep.update(O.pair_report(dets, a, b, attrs=("colour",), suffix="_colour"))
    for token, c in tokens.items():
        single = oracle.detect(draw(bundle, [f"a photo of {token} {c[2]}{where}"] * n, seeds, steps, cfg))
        name = token.strip("<>")
        rep[f"fidelity_{name}"] = sum(any(O.is_concept(d, c) for d in ds) for ds in single) / n
        rep[f"colour_fidelity_{name}"] = sum(any(d.colour == c[0] for d in ds) for ds in single) / n
    names = [t.strip("<>") for t in tokens]
    rep["fidelity"] = sum(rep[f"fidelity_{x}"] for x in names) / len(names)
    rep["colour_fidelity"] = sum(rep[f"colour_fidelity_{x}"] for x in names) / len(names)
    return rep, pictures
