"""The toy world's oracle: which objects a picture holds, where, and with which attributes.

A small fully convolutional net labels every pixel with ground-or-shape, colour and pattern; it
is trained on rendered scenes (exact masks, so exact pixel labels), blurred, noised and - when
the toy VAE is given - passed through the VAE, so it also reads the decoder's soft edges.
Objects are the connected foreground regions; each gets the attributes its pixels vote for,
its size from its area, and its box. `concept_prob` is the detector confidence CLIF's
confusion score (paper A.2) needs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import toyworld as tw

ORACLE_PATH = tw.WEIGHTS_DIR / "oracle.safetensors"
CLASSES = ("ground",) + tw.SHAPES
COLOURS = tuple(tw.COLOURS)
MIN_AREA = 12  # pixels: smaller specks are not objects


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation),
                         nn.GroupNorm(8, cout), nn.SiLU())


class OracleNet(nn.Module):
    """64 px in, per-pixel logits out: ground+shapes, colours, patterns."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.full = _block(3, w)  # one cheap full-resolution layer keeps edges; the rest runs at 1/4
        self.down = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, dilation=2),
                                  _block(4 * w, 4 * w, dilation=4))
        self.head = nn.Sequential(nn.Conv2d(5 * w, 2 * w, 1), nn.SiLU(),
                                  nn.Conv2d(2 * w, len(CLASSES) + len(COLOURS) + 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.full(x * 2 - 1)
        d = F.interpolate(self.down(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([f, d], 1))

    def split(self, logits: torch.Tensor):
        a, b = len(CLASSES), len(CLASSES) + len(COLOURS)
        return logits[:, :a], logits[:, a:b], logits[:, b:]


class ShapeNet(nn.Module):
    """An object's shape from its silhouette (the region's mask, cropped square and resized): per-pixel
    shape votes are unreliable - a pixel of a ball and one of a box look alike - the whole outline is not."""

    CROP = 24

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(32 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, len(tw.SHAPES)))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops * 2 - 1)


def silhouette(mask: np.ndarray, size: int = ShapeNet.CROP) -> torch.Tensor:
    """[1, size, size]: the region's mask in a square box around it (2 px margin), resized."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2 + 2
    y0, x0 = math.floor(cy - half), math.floor(cx - half)
    side = math.ceil(2 * half)
    pad = np.zeros((side, side), np.float32)
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(mask.shape[0], y0 + side), min(mask.shape[1], x0 + side)
    pad[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    return F.interpolate(torch.from_numpy(pad)[None, None], size=(size, size), mode="bilinear",
                         align_corners=False)[0]


def pixel_labels(scene: tw.Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel targets; colour and pattern are -1 (ignored) on the ground."""
    cls = np.zeros((tw.SIZE, tw.SIZE), np.int64)
    col = np.full((tw.SIZE, tw.SIZE), -1, np.int64)
    pat = np.full((tw.SIZE, tw.SIZE), -1, np.int64)
    for o, m in zip(scene.objects, scene.masks):
        cls[m] = CLASSES.index(o.shape)
        col[m] = COLOURS.index(o.colour)
        pat[m] = tw.PATTERNS.index(o.pattern)
    return cls, col, pat


def oracle_scene(seed: int, index: int) -> tw.Scene:
    """Training scenes for the oracle: like the world, held-out combinations included (the oracle
    must recognise the personal concepts too)."""
    rng = random.Random(f"oracle:{seed}:{index}")
    n = rng.choices(tw.COUNTS, tw.COUNT_WEIGHTS)[0]
    objs = tw.place(rng, [tw.random_spec(rng, allow_held_out=True) for _ in range(n)])
    ground = rng.choice(list(tw.GROUNDS))
    img, masks = tw.paint(objs, ground)
    return tw.Scene(objs, ground, "", masks, img)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.2:
        return x
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-k ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).repeat(c, 1, 1, 1), groups=c)


def degrade(x: torch.Tensor, g: torch.Generator, vae=None) -> torch.Tensor:
    """What generated pictures suffer: the VAE round trip (when given), blur, noise, tint."""
    if vae is not None:
        with torch.no_grad():
            post = vae.encode(x * 2 - 1).latent_dist
            z = post.mean + 0.1 * torch.randn(post.mean.shape, generator=g) / vae.config.scaling_factor
            x = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
    out = []
    for im in x:
        im = _blur(im[None], float(torch.rand((), generator=g)) * 1.2)[0]
        im = im * (1 + 0.08 * (torch.rand(3, 1, 1, generator=g) - 0.5)) + 0.03 * torch.randn(im.shape, generator=g)
        out.append(im.clamp(0, 1))
    return torch.stack(out)


def train_oracle(steps: int = 1500, batch: int = 32, seed: int = 0, vae=None, lr: float = 2e-3,
                 log=print) -> OracleNet:
    torch.manual_seed(seed)
    net = OracleNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        scenes = [oracle_scene(seed, step * batch + i) for i in range(batch)]
        x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
        use_vae = vae if (vae is not None and step % 2 == 0) else None
        x = degrade(x, g, use_vae)
        labels = [pixel_labels(s) for s in scenes]
        cls, col, pat = (torch.from_numpy(np.stack([lab[i] for lab in labels])) for i in range(3))
        lc, lk, lp = net.split(net(x))
        loss = F.cross_entropy(lc, cls) + F.cross_entropy(lk, col, ignore_index=-1) + \
            F.cross_entropy(lp, pat, ignore_index=-1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % 100 == 0:
            log(f"[oracle] step {step + 1}/{steps} loss {float(loss):.4f}")
    return net.eval()


def train_shape_net(oracle: Oracle, steps: int = 300, batch: int = 16, seed: int = 0, vae=None,
                    lr: float = 2e-3, log=print) -> ShapeNet:
    """The silhouette classifier, on the regions the trained pixel net finds in degraded renders
    (what it will see in generated pictures), labelled by matching them to the true objects."""
    torch.manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        g = torch.Generator().manual_seed(seed * 100_003 + 50_000 + step)
        scenes = [oracle_scene(seed + 1, step * batch + i) for i in range(batch)]
        x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
        x = degrade(x, g, vae if (vae is not None and step % 2 == 0) else None)
        _, regions = oracle.regions(x.permute(0, 2, 3, 1))
        crops, labels = [], []
        for s, regs in zip(scenes, regions):
            for o, m in zip(s.objects, s.masks):
                best = max(regs, key=lambda r: (r & m).sum() / max(1, (r | m).sum()), default=None)
                if best is not None and (best & m).sum() / max(1, (best | m).sum()) >= 0.3:
                    crops.append(silhouette(best))
                    labels.append(tw.SHAPES.index(o.shape))
        if not crops:
            continue
        loss = F.cross_entropy(net(torch.stack(crops)), torch.tensor(labels))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % 100 == 0:
            log(f"[oracle] shape step {step + 1}/{steps} loss {float(loss):.4f}")
    return net.eval()


@dataclass
class Detection:
    shape: str
    colour: str
    pattern: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    centre: tuple[float, float]
    area: int
    mask: np.ndarray  # bool [H, W]
    shape_p: dict[str, float]
    colour_p: dict[str, float]
    pattern_p: dict[str, float]

    @property
    def concept(self) -> tuple[str, str, str]:
        return (self.colour, self.pattern, self.shape)

    def concept_prob(self, colour: str | None = None, shape: str | None = None, pattern: str | None = None) -> float:
        """Confidence that this region is the described object (the named attributes only)."""
        p = 1.0
        if colour:
            p *= self.colour_p[colour]
        if shape:
            p *= self.shape_p[shape]
        if pattern:
            p *= self.pattern_p[pattern]
        return p


def _size_of(shape: str, area: int) -> str:
    """Equivalent half-extent from the area of the shape, split between the world's two sizes."""
    factor = {"ball": math.pi, "box": 4 * 0.85 ** 2, "pyramid": 0.58 * 1.8 ** 2, "ring": 0.75 * math.pi}[shape]
    r = math.sqrt(area / factor)
    return "big" if r >= (tw.SIZES["small"][1] + tw.SIZES["big"][0]) / 2 else "small"


class Oracle:
    def __init__(self, net: OracleNet, shape_net: ShapeNet | None = None):
        self.net = net.eval().requires_grad_(False)
        self.shape_net = shape_net.eval().requires_grad_(False) if shape_net is not None else None

    @classmethod
    def load(cls, path: str | Path | None = None) -> Oracle:
        from safetensors.torch import load_file

        sd = {k: v.float() for k, v in load_file(str(path or ORACLE_PATH)).items()}
        net, shape_net = OracleNet(), None
        net.load_state_dict({k: v for k, v in sd.items() if not k.startswith("shape.")})
        if any(k.startswith("shape.") for k in sd):
            shape_net = ShapeNet()
            shape_net.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("shape.")})
        return cls(net, shape_net)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        from ..files import atomic_save_safetensors

        sd = dict(self.net.state_dict())
        if self.shape_net is not None:
            sd.update({"shape." + k: v for k, v in self.shape_net.state_dict().items()})
        atomic_save_safetensors(path, sd, metadata=metadata)

    def regions(self, images: torch.Tensor):
        """Per picture: the per-pixel probabilities and the foreground regions (bool masks)."""
        from scipy import ndimage

        pc, pk, pp = self.probs(images)
        out = []
        for b in range(pc.shape[0]):
            lab, n = ndimage.label((pc[b, 0] < 0.5).numpy())
            masks = [lab == i for i in range(1, n + 1)]
            out.append([m for m in masks if m.sum() >= MIN_AREA])
        return (pc, pk, pp), out

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B,H,W,3] 0..1 (the pack's layout) -> per-pixel probabilities (class, colour, pattern)."""
        x = images.float().permute(0, 3, 1, 2)
        if x.shape[-1] != tw.SIZE:
            x = F.interpolate(x, size=(tw.SIZE, tw.SIZE), mode="bilinear", antialias=True, align_corners=False)
        return tuple(t.softmax(1) for t in self.net.split(self.net(x)))

    def detect(self, images: torch.Tensor) -> list[list[Detection]]:
        """Objects in each picture, largest first."""
        (pc, pk, pp), regions = self.regions(images)
        out = []
        for b in range(pc.shape[0]):
            dets = []
            for m in regions[b]:
                area = int(m.sum())
                mt = torch.from_numpy(m)
                if self.shape_net is not None:
                    with torch.no_grad():
                        sp = self.shape_net(silhouette(m)[None])[0].softmax(0)
                else:
                    sp = pc[b, 1:, mt].mean(1)
                    sp = sp / sp.sum()
                kp, ptp = pk[b][:, mt].mean(1), pp[b][:, mt].mean(1)
                shape = tw.SHAPES[int(sp.argmax())]
                ys, xs = np.nonzero(m)
                dets.append(Detection(
                    shape=shape, colour=COLOURS[int(kp.argmax())], pattern=tw.PATTERNS[int(ptp.argmax())],
                    size=_size_of(shape, area), box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                    centre=(float(xs.mean()), float(ys.mean())), area=area, mask=m,
                    shape_p=dict(zip(tw.SHAPES, sp.tolist())), colour_p=dict(zip(COLOURS, kp.tolist())),
                    pattern_p=dict(zip(tw.PATTERNS, ptp.tolist()))))
            out.append(sorted(dets, key=lambda d: -d.area))
        return out


def match(objects: list[tw.Obj], masks: list[np.ndarray], dets: list[Detection], min_iou: float = 0.3):
    """Greedy IoU matching of true objects to detections: [(obj, detection or None)]."""
    pairs, used = [], set()
    for o, m in zip(objects, masks):
        best, bi = None, 0.0
        for j, d in enumerate(dets):
            if j in used:
                continue
            inter = float((m & d.mask).sum())
            iou = inter / max(1.0, float((m | d.mask).sum()))
            if iou > bi:
                best, bi = j, iou
        if best is not None and bi >= min_iou:
            used.add(best)
            pairs.append((o, dets[best]))
        else:
            pairs.append((o, None))
    return pairs


def score_renders(oracle: Oracle, scenes: list[tw.Scene], images: torch.Tensor | None = None) -> dict[str, float]:
    """Object recall and attribute accuracy (of the found objects) against the scenes' truth;
    `images` replaces the exact renders (e.g. their VAE round trip)."""
    if images is None:
        images = torch.from_numpy(np.stack([s.image for s in scenes])).float() / 255
    dets = oracle.detect(images)
    n = found = allr = spurious = 0
    right = {"shape": 0, "colour": 0, "pattern": 0, "size": 0}
    for s, d in zip(scenes, dets):
        pairs = match(s.objects, s.masks, d)
        spurious += max(0, len(d) - sum(1 for _, x in pairs if x is not None))
        for o, x in pairs:
            n += 1
            if x is None:
                continue
            found += 1
            for k in right:
                right[k] += int(getattr(o, k) == getattr(x, k))
            allr += int((o.shape, o.colour, o.pattern) == (x.shape, x.colour, x.pattern))
    out = {"objects": n, "recall": found / max(1, n), "spurious_per_image": spurious / max(1, len(scenes))}
    out.update({f"{k}_acc": v / max(1, found) for k, v in right.items()})
    out["all_attributes_acc"] = allr / max(1, n)  # found and every attribute right, of all objects
    return out


# ---------------------------------------------------------------- the experiment's measures
Concept3 = tuple[str, str, str]  # (colour, pattern, shape)
ALL = ("colour", "pattern", "shape")


def is_concept(d: Detection, c: Concept3, attrs: tuple[str, ...] = ALL) -> bool:
    return all(getattr(d, a) == c[ALL.index(a)] for a in attrs)


def concept_p(d: Detection, c: Concept3, attrs: tuple[str, ...] = ALL) -> float:
    return d.concept_prob(**{a: c[ALL.index(a)] for a in attrs})


def confusion_score(dets: list[Detection], a: Concept3, b: Concept3, detected: float = 0.5,
                    attrs: tuple[str, ...] = ALL) -> float:
    """CLIF's confusion degree (paper A.2, eq. 6) of one picture of 'A and B': the box detected as A
    (the detection most like A, if the oracle gives it at least `detected`) and the one detected as
    B, each scored by the oracle for both concepts; a concept without a box scores 0 for both.
    0 = decoupled; 1 = indistinguishable or absent; 0.5 = one of them drawn, the other missing.
    `attrs`: the attributes that make a concept (e.g. colour alone, when shapes are not drawn)."""
    def term(x: Concept3, y: Concept3) -> float:
        box = max(dets, key=lambda d: concept_p(d, x, attrs), default=None)
        if box is None or concept_p(box, x, attrs) < detected:
            return 0.0
        return abs(concept_p(box, x, attrs) - concept_p(box, y, attrs))

    return 1 - (term(a, b) + term(b, a)) / 2


def assign_pair(dets: list[Detection], a: Concept3, b: Concept3, attrs: tuple[str, ...] = ALL):
    """The detections standing for A and for B (distinct; None when too few): the assignment
    with the highest summed concept probability."""
    best, pick = -1.0, (None, None)
    for i, da in enumerate(dets + [None]):
        for j, db in enumerate(dets + [None]):
            if da is not None and db is not None and i == j:
                continue
            s = (concept_p(da, a, attrs) if da else 0) + (concept_p(db, b, attrs) if db else 0)
            if s > best:
                best, pick = s, (da, db)
    return pick


def outcome(d: Detection | None, own: Concept3, other: Concept3, attrs: tuple[str, ...] = ALL) -> str:
    """What stands where a concept should be: itself, the other concept, a mix or nothing."""
    if d is None:
        return "missing"
    if is_concept(d, own, attrs):
        return "own"
    if is_concept(d, other, attrs):
        return "other"
    return "mixed"


def pair_report(dets_per_image: list[list[Detection]], a: Concept3, b: Concept3, attrs: tuple[str, ...] = ALL,
                suffix: str = "") -> dict:
    """Oracle measures of pictures of 'A and B': presence of each (attendance), both, CLIF's
    confusion degree, and the leakage matrix (what stands where A / B should be); a concept is
    recognised by `attrs` (all three, or e.g. colour alone), the keys get `suffix`."""
    n = max(1, len(dets_per_image))
    out = {"images": len(dets_per_image)}
    pa = [any(is_concept(d, a, attrs) for d in ds) for ds in dets_per_image]
    pb = [any(is_concept(d, b, attrs) for d in ds) for ds in dets_per_image]
    out["present_a"], out["present_b"] = sum(pa) / n, sum(pb) / n
    out["both"] = sum(x and y for x, y in zip(pa, pb)) / n
    out["confusion_degree"] = sum(confusion_score(ds, a, b, attrs=attrs) for ds in dets_per_image) / n
    keys = ("own", "other", "mixed", "missing")
    m = {"a": dict.fromkeys(keys, 0), "b": dict.fromkeys(keys, 0)}
    for ds in dets_per_image:
        da, db = assign_pair(ds, a, b, attrs)
        m["a"][outcome(da, a, b, attrs)] += 1
        m["b"][outcome(db, b, a, attrs)] += 1
    out["leakage"] = {k: {kk: v / n for kk, v in row.items()} for k, row in m.items()}
    out["leak_rate"] = (m["a"]["other"] + m["b"]["other"]) / (2 * n)
    return {(k + suffix if k != "images" else k): v for k, v in out.items()}


def prompt_report(dets_per_image: list[list[Detection]], wanted: list[Concept3]) -> dict:
    """Base-model quality for a prompt naming `wanted` objects: object recall (full attributes,
    distinct detections) and per-attribute accuracy of the best-matching detection."""
    n_obj = found = 0
    attr = {"colour": 0, "shape": 0, "pattern": 0}
    for ds in dets_per_image:
        free = list(ds)
        for c in wanted:
            n_obj += 1
            hit = next((d for d in free if is_concept(d, c)), None)
            if hit is not None:
                found += 1
                free.remove(hit)
            near = max(ds, key=lambda d: concept_p(d, c), default=None)
            if near is not None:
                attr["colour"] += near.colour == c[0]
                attr["pattern"] += near.pattern == c[1]
                attr["shape"] += near.shape == c[2]
    return {"recall": found / max(1, n_obj), **{f"{k}_acc": v / max(1, n_obj) for k, v in attr.items()}}
