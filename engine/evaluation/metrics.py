"""The papers' evaluation metrics, on a user's own generated images.

Each metric is one function registered with `@metric` (its name, what it measures, its source and what
it needs, declared once): `evaluate` runs every registered metric on shared, lazily computed features,
and docs/metrics.md is generated from the declarations. Also here: the segments SID's metrics use,
mask IoU (the EM paper's check against user masks) and the report with its files.

The feature models are anything with `image_features(list of [h,w,3]) -> [N, D]` (unit norm) and,
for CLIP-T, `text_features(list of str) -> [N, D]`: the open_clip scorer (clip_zero_shot), DINO
(engine/vision/dino.py), or fixed features in the tests. Nothing here downloads or knows ComfyUI.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from .. import host
from ..errors import UnconfusedError
from ..vision.regions import iou

NODE = "UnconfusedEvaluate"
NODE_IOU = "UnconfusedMaskIoU"
CONVENTIONS = {"cosine": "plain cosine (DreamBooth style)",
               "clipscore": "CLIPScore 2.5 x max(cosine, 0) (Custom Diffusion style)"}
TEXT_MODES = {"class": "concept tokens replaced by their class words",
              "remove": "concept tokens removed"}
FILL = 0.5  # grey: what the CLIP preprocessing pads with too


class ImageFeatures(Protocol):
    name: str

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor: ...


# ------------------------------------------------------------------ prompts
def tokens_in(prompt: str, tokens: Sequence[str]) -> list[str]:
    """The concept tokens a prompt names, in the order given."""
    return [t for t in tokens if re.search(r"(?<![\w-])" + re.escape(t) + r"(?![\w-])", prompt)]


def eval_prompt(prompt: str, class_words: dict[str, str], mode: str = "class") -> str:
    """The prompt CLIP-T scores: "<alice> woman" or a lone "<alice>" becomes "woman" (mode class),
    or the token is dropped (mode remove). A token followed by its class word is not doubled."""
    if mode not in TEXT_MODES:
        raise UnconfusedError(f"unknown text mode {mode!r}; use one of {sorted(TEXT_MODES)}",
                              input="text_mode")
    out = prompt
    for token, word in class_words.items():
        t = re.escape(token)
        if mode == "class":
            out = re.sub(t + r"(\s+" + re.escape(word) + r")?(?![\w-])", word, out)
        else:
            out = re.sub(t, "", out)
    return re.sub(r"\s+", " ", re.sub(r"\s+([,.;:!?])", r"\1", out)).strip()


# ------------------------------------------------------------------ segments
def _bbox(mask: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def subject_segment(image: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor | None:
    """The subject cut out: cropped to its box, the rest grey (the scorer pads it square and resizes:
    SID's "centre alignment and image resizing"). None for an empty mask."""
    box = _bbox(mask, threshold)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    keep = (mask[y0:y1, x0:x1] > threshold)[..., None]
    return torch.where(keep, image[y0:y1, x0:x1], torch.full_like(image[y0:y1, x0:x1], FILL))


def non_subject_segment(image: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The photo with the subject blanked out grey: what must not leak into the subject token."""
    return torch.where((mask > threshold)[..., None], torch.full_like(image, FILL), image)


def _check_masks(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None, what: str,
                 input: str) -> None:
    if masks is None:
        return
    if len(masks) != len(images):
        raise UnconfusedError(f"{len(masks)} masks for {len(images)} images of {what}; give one mask per image", input=input)
    for i, (m, img) in enumerate(zip(masks, images)):
        if tuple(m.shape[-2:]) != tuple(img.shape[:2]):
            raise UnconfusedError(f"mask {i} of {what} is {m.shape[-1]}x{m.shape[-2]} but its image is "
                                  f"{img.shape[1]}x{img.shape[0]}; masks must have their image's size",
                                  input=input)


# ------------------------------------------------------------------ numbers
def pairwise_mean(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean cosine over all pairs (rows are unit-norm features); None when either side is empty."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return None
    return float((a @ b.T).mean())


def text_alignment(image_feats: torch.Tensor, text_feats: torch.Tensor, convention: str = "cosine") -> torch.Tensor:
    """Per image: its cosine with its own prompt (rows paired), in the chosen convention."""
    if convention not in CONVENTIONS:
        raise UnconfusedError(f"unknown convention {convention!r}; use one of {sorted(CONVENTIONS)}",
                              input="convention")
    cos = (image_feats * text_feats).sum(dim=-1)
    return 2.5 * cos.clamp(min=0) if convention == "clipscore" else cos


def diversity(feats: torch.Tensor) -> float | None:
    """Mean pairwise (1 - cosine) over distinct pairs; None for fewer than two images."""
    n = feats.shape[0]
    if n < 2:
        return None
    sims = feats @ feats.T
    off = sims[~torch.eye(n, dtype=torch.bool)]
    return float((1 - off).mean())


def mask_iou(a: Sequence[torch.Tensor] | torch.Tensor, b: Sequence[torch.Tensor] | torch.Tensor,
             threshold: float = 0.5) -> list[float]:
    """IoU of each pair of masks (binarised at `threshold`). A batch of one is compared with every
    mask of the other; a different size with the same aspect ratio is resized (nearest) to the
    first's; two empty masks count as IoU 1 (they agree)."""
    a = [m for m in a] if not isinstance(a, torch.Tensor) or a.ndim == 3 else [a]
    b = [m for m in b] if not isinstance(b, torch.Tensor) or b.ndim == 3 else [b]
    if not a or not b:
        raise UnconfusedError("a mask batch is empty; connect masks to both inputs",
                              input="masks_a" if not a else "masks_b")
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        raise UnconfusedError(f"{len(a)} masks against {len(b)}: give batches of the same length (or one mask)", input="masks_b")
    n = max(len(a), len(b))
    out = []
    for i in range(n):
        x, y = a[i if len(a) > 1 else 0].float(), b[i if len(b) > 1 else 0].float()
        if x.shape != y.shape:
            ra, rb = x.shape[1] / x.shape[0], y.shape[1] / y.shape[0]
            if abs(ra - rb) > 0.01 * ra:
                raise UnconfusedError(f"mask {i}: {x.shape[1]}x{x.shape[0]} against {y.shape[1]}x{y.shape[0]} - "
                                      "different aspect ratios cannot be compared; resize or crop one batch to the "
                                      "other's size", input="masks_b")
            y = F.interpolate(y[None, None], size=tuple(x.shape), mode="nearest")[0, 0]
        out.append(iou(x, y, threshold))
    return out


def confusion_counts(region_feats: torch.Tensor, intended: Sequence[int], reference_means: torch.Tensor) -> torch.Tensor:
    """[K, K] counts: row = the concept that should be in the region, column = the concept whose
    references match the region best."""
    k = reference_means.shape[0]
    counts = torch.zeros(k, k, dtype=torch.long)
    if region_feats.shape[0]:
        best = (region_feats @ reference_means.T).argmax(dim=1)
        for row, col in zip(intended, best.tolist()):
            counts[row, col] += 1
    return counts


def _mean_direction(feats: torch.Tensor) -> torch.Tensor:
    return F.normalize(feats.mean(dim=0), dim=-1)


# ------------------------------------------------------------------ the evaluation
@dataclass
class Reference:
    token: str
    class_word: str
    images: list[torch.Tensor]
    masks: list[torch.Tensor] | None = None


@dataclass
class EvalSettings:
    convention: str = "cosine"
    text_mode: str = "class"
    region_threshold: float = 0.5


@dataclass
class EvalReport:
    rows: list[dict] = field(default_factory=list)  # metric, concept, value, n, model, note
    per_image: list[dict] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    confusion: torch.Tensor | None = None  # [K, K] counts
    attendance: torch.Tensor | None = None  # [K, K] concept (row) with partner (column); NaN = not generated
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value, *, concept: str = "all", n: int = 0, model: str = "", note: str = "") -> None:
        if value is not None:
            self.rows.append({"metric": metric, "concept": concept, "value": round(float(value), 6), "n": int(n),
                              "model": model, "note": note})

    def value(self, metric: str, concept: str = "all") -> float | None:
        for r in self.rows:
            if r["metric"] == metric and r["concept"] == concept:
                return r["value"]
        return None

    def to_json(self) -> dict:
        def matrix(m):
            return None if m is None else [[None if v != v else round(float(v), 6) for v in row] for row in m.tolist()]

        return {"settings": self.settings, "rows": self.rows, "per_image": self.per_image, "tokens": self.tokens,
                "confusion": matrix(self.confusion), "attendance": matrix(self.attendance), "notes": self.notes}

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["metric", "concept", "value", "n", "model", "note"], lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()

    def table(self) -> str:
        """The numbers as a fixed-width text table (the node's STRING output)."""
        lines = [f"convention: {self.settings['convention_text']}; prompts: {self.settings['text_mode_text']}"] \
            if self.settings.get("convention_text") else []
        lines.append(f"{'metric':<30} {'concept':<16} {'value':>9} {'n':>5}  model")
        for r in self.rows:
            lines.append(f"{r['metric']:<30} {r['concept']:<16} {r['value']:>9.4f} {r['n']:>5}  {r['model']}"
                         + (f"  ({r['note']})" if r["note"] else ""))
        if self.confusion is not None:
            total = int(self.confusion.sum())
            right = int(self.confusion.diag().sum())
            lines.append(f"confusion: {right}/{total} regions matched their own concept")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def write(self, folder: str | Path) -> dict[str, Path]:
        """report.json, metrics.csv, per_image.csv and the heat maps. They are written into a
        temporary folder beside `folder` and moved in only when all are complete, so a full disk
        or a crash never leaves a report folder with half of its files."""
        import shutil
        import uuid

        from ..files import atomic_save_image, atomic_write_json, atomic_write_text

        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            names = [atomic_write_json(tmp / "report.json", self.to_json()).name,
                     atomic_write_text(tmp / "metrics.csv", self.csv()).name]
            if self.per_image:
                buf = io.StringIO()
                keys = list(dict.fromkeys(k for row in self.per_image for k in row))
                w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
                w.writeheader()
                w.writerows(self.per_image)
                names.append(atomic_write_text(tmp / "per_image.csv", buf.getvalue()).name)
            names += [atomic_save_image(tmp / f"{name}.png", picture).name for name, picture in
                      self.pictures().items()]
            if folder.exists():  # an existing report folder (the command's output): file by file
                for name in names:
                    os.replace(tmp / name, folder / name)
            else:
                os.replace(tmp, folder)
        except OSError as e:
            raise UnconfusedError(f"could not write the report into {folder}: {e.strerror or e}. Check that the "
                                  "folder is writable and the disk is not full") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        keys = {"report.json": "json", "metrics.csv": "csv", "per_image.csv": "per_image"}
        return {keys.get(n, n.removesuffix(".png")): folder / n for n in names}

    def pictures(self) -> dict:
        from ..preview import heatmap

        pics = {}
        if self.confusion is not None:
            rows = self.confusion.float()
            frac = rows / rows.sum(dim=1, keepdim=True).clamp(min=1)
            frac[rows.sum(dim=1) == 0] = float("nan")
            pics["confusion"] = heatmap(frac, self.tokens, self.tokens, title="confusion: region of (row) matched "
                                        "(column)", counts=self.confusion)
        if self.attendance is not None:
            pics["attendance"] = heatmap(self.attendance, self.tokens, self.tokens,
                                         title="attendance: concept (row) generated with (column)")
        return pics


# ------------------------------------------------------------------ the metrics, declared once
@dataclass(frozen=True)
class Metric:
    """One metric of the report: its row name(s), what it measures, where it comes from and what
    it needs. `docs/metrics.md` is generated from these declarations (scripts/gen_docs.py metrics)."""

    name: str
    title: str
    what: str
    source: str
    needs: str = ""
    per_concept: bool = False  # one row per concept, plus their mean as concept "all"
    rows: tuple[str, ...] = ()  # further row names it writes (variants)
    fn: Callable[["EvalInputs", "EvalReport"], None] | None = field(default=None, compare=False, repr=False)


METRICS: dict[str, Metric] = {}


def metric(name: str, title: str, what: str, source: str, *, needs: str = "", per_concept: bool = False,
           rows: tuple[str, ...] = ()):
    """Register `fn(inputs, report)` as a metric: adding a metric is this decorator on one function
    (plus its test); `evaluate`, the report, the docs page and the CLI pick it up."""

    def register(fn):
        METRICS[name] = Metric(name, title, what, source, needs, per_concept, rows, fn)
        return fn

    return register


def _features(model, images: list[torch.Tensor]) -> torch.Tensor:
    return model.image_features(images) if images else torch.zeros(0, 1)


class EvalInputs:
    """What every metric reads, with each feature computed once and only when a metric asks."""

    def __init__(self, images, prompts, references, clip, dino, region_masks, settings):
        self.images, self.prompts, self.references = images, prompts, references
        self.clip, self.dino, self.region_masks, self.s = clip, dino, region_masks, settings
        self.tokens = [r.token for r in references]
        self.present = [tokens_in(p, self.tokens) for p in prompts]
        self.clip_name = getattr(clip, "name", "clip")
        self.dino_name = getattr(dino, "name", "dino")
        self._cache: dict = {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def gen(self) -> torch.Tensor:
        """CLIP image features of the generated pictures."""
        return self._once("gen", lambda: self.clip.image_features(self.images))

    @property
    def gen_dino(self) -> torch.Tensor:
        return self._once("gen_dino", lambda: self.dino.image_features(self.images))

    def refs(self, k: int) -> torch.Tensor:
        return self._once(("refs", k), lambda: self.clip.image_features(self.references[k].images))

    def segments(self, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """CLIP features of concept k's subject segments and non-subject segments (None without masks)."""
        def make():
            r = self.references[k]
            if r.masks is None:
                return None, None
            cut = [subject_segment(img, m, self.s.region_threshold) for img, m in zip(r.images, r.masks)]
            cut = [c for c in cut if c is not None]
            subs = self.clip.image_features([non_subject_segment(img, m, self.s.region_threshold)
                                             for img, m in zip(r.images, r.masks)])
            return (self.clip.image_features(cut) if cut else None), subs
        return self._once(("segments", k), make)

    def naming(self, k: int, pick=lambda ts: True) -> list[int]:
        """The pictures whose prompt names concept k (and passes `pick` on its token list)."""
        return [i for i, ts in enumerate(self.present) if self.tokens[k] in ts and pick(ts)]


SPLITS = (("single", lambda ts: len(ts) == 1), ("multi", lambda ts: len(ts) >= 2))


@metric("clip_t", "CLIP-T (text alignment)",
        "cosine of each picture and its prompt with the concept tokens replaced by their class words (text mode "
        "`class`: \"a photo of <alice> woman\" -> \"a photo of woman\") or removed (`remove`); convention `cosine` "
        "(plain, DreamBooth style) or `clipscore` (2.5 x max(cosine, 0), Custom Diffusion); also split into "
        "single- and multi-concept prompts", "DreamBooth; Custom Diffusion; CLIF Table 1",
        rows=("clip_t_single", "clip_t_multi"))
def _clip_t(x: EvalInputs, report: EvalReport) -> None:
    class_words = {r.token: r.class_word for r in x.references}
    texts = [eval_prompt(p, class_words, x.s.text_mode) for p in x.prompts]
    ta = text_alignment(x.gen, x.clip.text_features(texts), x.s.convention)
    for i, (p, t, v) in enumerate(zip(x.prompts, texts, ta.tolist())):
        report.per_image.append({"image": i, "prompt": p, "scored_prompt": t, "concepts": " ".join(x.present[i]),
                                 "clip_t": round(v, 6)})
    report.add("clip_t", ta.mean(), n=len(x.images), model=x.clip_name, note=x.s.convention)
    for mode, pick in SPLITS:
        idx = [i for i, ts in enumerate(x.present) if pick(ts)]
        if idx:
            report.add(f"clip_t_{mode}", ta[idx].mean(), n=len(idx), model=x.clip_name, note=x.s.convention)


@metric("clip_i", "CLIP-I (image alignment)",
        "mean pairwise cosine of the pictures naming a concept and its reference photos, overall and for single- "
        "vs multi-concept prompts", "DreamBooth; CLIF Table 1", per_concept=True,
        rows=("clip_i_single", "clip_i_multi"))
def _clip_i(x: EvalInputs, report: EvalReport) -> None:
    for k, token in enumerate(x.tokens):
        with_k = x.naming(k)
        if not with_k:
            continue
        report.add("clip_i", pairwise_mean(x.gen[with_k], x.refs(k)), concept=token, n=len(with_k), model=x.clip_name)
        for mode, pick in SPLITS:
            idx = x.naming(k, pick)
            if idx:
                report.add(f"clip_i_{mode}", pairwise_mean(x.gen[idx], x.refs(k)), concept=token, n=len(idx),
                           model=x.clip_name)


@metric("subject_alignment", "SID subject alignment",
        "mean pairwise cosine of the pictures and the references' subject segments (cropped to the subject, the "
        "rest grey, centred and resized)", "SID section 4", needs="masks on the concepts (SAM cut-outs)",
        per_concept=True)
def _subject_alignment(x: EvalInputs, report: EvalReport) -> None:
    for k, token in enumerate(x.tokens):
        segs, _ = x.segments(k)
        with_k = x.naming(k)
        if segs is not None and with_k:
            report.add("subject_alignment", pairwise_mean(x.gen[with_k], segs), concept=token, n=len(with_k),
                       model=x.clip_name)
    if x.references and not any(r.masks is not None for r in x.references):
        report.notes.append("the references have no masks: subject-alignment and non-subject-disentanglement "
                            "need them (connect the SAM cut-out masks to the concepts)")


@metric("non_subject_disentanglement", "SID non-subject disentanglement",
        "1 - mean pairwise cosine of the pictures and the references' non-subject segments (the subject greyed "
        "out): high = the background did not come along", "SID section 4",
        needs="masks on the concepts (SAM cut-outs)", per_concept=True)
def _non_subject(x: EvalInputs, report: EvalReport) -> None:
    for k, token in enumerate(x.tokens):
        _, subs = x.segments(k)
        with_k = x.naming(k)
        if subs is not None and with_k:
            report.add("non_subject_disentanglement", 1 - pairwise_mean(x.gen[with_k], subs), concept=token,
                       n=len(with_k), model=x.clip_name)


@metric("dino", "DINO (image alignment)",
        "as CLIP-I with a DINO model's class token (unit norm)", "DreamBooth", needs="a DINO model",
        per_concept=True)
def _dino(x: EvalInputs, report: EvalReport) -> None:
    if x.dino is None:
        return
    for k, token in enumerate(x.tokens):
        with_k = x.naming(k)
        if with_k:
            host.check_cancel()
            report.add("dino", pairwise_mean(x.gen_dino[with_k], x.dino.image_features(x.references[k].images)),
                       concept=token, n=len(with_k), model=x.dino_name)


@metric("attendance", "CLIF attendance",
        "for each concept, its image alignment in the pictures made with it and exactly one other concept, "
        "averaged over the partners; the heat map `attendance` shows every pair (\"-\" = not generated)",
        "CLIF appendix A.3", needs="prompts naming two concepts", per_concept=True)
def _attendance(x: EvalInputs, report: EvalReport) -> None:
    attendance = torch.full((len(x.tokens), len(x.tokens)), float("nan"))
    for k, token in enumerate(x.tokens):
        for j, other in enumerate(x.tokens):
            idx = x.naming(k, lambda ts: set(ts) == {token, other}) if j != k else []
            if idx:
                attendance[k, j] = pairwise_mean(x.gen[idx], x.refs(k))
        row = attendance[k][~attendance[k].isnan()]
        if row.numel():
            report.add("attendance", row.mean(), concept=token, n=int(row.numel()), model=x.clip_name,
                       note="mean over partner concepts")
    if (~attendance.isnan()).any():
        report.attendance = attendance


@metric("diversity", "Diversity",
        "mean pairwise 1 - cosine among the pictures of one prompt (CLIP features; LPIPS is left out: its networks "
        "are downloaded)", "DreamBooth (as feature diversity, not LPIPS)", needs="two or more pictures of a prompt")
def _diversity(x: EvalInputs, report: EvalReport) -> None:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(x.prompts):
        groups.setdefault(p, []).append(i)
    divs = [(diversity(x.gen[idx]), len(idx)) for idx in groups.values() if len(idx) >= 2]
    if divs:
        report.add("diversity", sum(d for d, _ in divs) / len(divs), n=sum(n for _, n in divs), model=x.clip_name,
                   note="1 - cosine within a prompt's images (feature diversity, not LPIPS)")


@metric("region_accuracy", "Confusion matrix",
        "for each region where concept B should be (its mask above `region_threshold`, cropped like a subject "
        "segment), which concept's references (mean feature of their subject segments) match best; row = meant, "
        "column = matched, the diagonal is no confusion; `region_accuracy` is its share, the heat map "
        "`confusion` shows fraction and count per cell", "CLIF section 3 (confusion), in the pack's region form",
        needs="region masks (the sampler's attention masks, or SAM masks of the pictures)")
def _confusion(x: EvalInputs, report: EvalReport) -> None:
    if x.region_masks is None or not x.references:
        return
    crops, intended = [], []
    for i, (img, masks) in enumerate(zip(x.images, x.region_masks)):
        for k, m in enumerate(masks):
            if m is None or x.tokens[k] not in x.present[i]:
                continue
            seg = subject_segment(img, m, x.s.region_threshold)
            if seg is not None:
                crops.append(seg)
                intended.append(k)
    if not crops:
        report.notes.append("no region mask covered anything above the threshold: no confusion matrix")
        return
    directions = []
    for k in range(len(x.tokens)):
        segs, _ = x.segments(k)
        directions.append(_mean_direction(segs if segs is not None and segs.shape[0] else x.refs(k)))
    report.confusion = confusion_counts(x.clip.image_features(crops), intended, torch.stack(directions))
    total = int(report.confusion.sum())
    report.add("region_accuracy", report.confusion.diag().sum() / total, n=total, model=x.clip_name,
               note="regions whose best-matching references are their own concept's")


def _check_inputs(x: EvalInputs) -> None:
    s = x.s
    if s.convention not in CONVENTIONS:
        raise UnconfusedError(f"unknown convention {s.convention!r}; use one of {sorted(CONVENTIONS)}",
                              input="convention")
    if s.text_mode not in TEXT_MODES:
        raise UnconfusedError(f"unknown text mode {s.text_mode!r}; use one of {sorted(TEXT_MODES)}",
                              input="text_mode")
    if not x.images:
        raise UnconfusedError("no generated images to evaluate; connect the sampler's images",
                              input="images")
    if len(x.prompts) != len(x.images):
        raise UnconfusedError(f"{len(x.prompts)} prompts for {len(x.images)} images; give one prompt for all or one "
                              "per image (one per line)", input="prompts")
    empty = [i for i, p in enumerate(x.prompts) if not str(p).strip()]
    if empty:
        raise UnconfusedError(f"image {empty[0]} has no prompt; CLIP-T needs the prompt each image was made from", input="prompts")
    for r in x.references:
        if not r.images:
            raise UnconfusedError(f"concept {r.token} has no reference images", input="concepts")
        _check_masks(r.images, r.masks, r.token, "concepts")
    if x.region_masks is None:
        return
    if len(x.region_masks) != len(x.images):
        raise UnconfusedError(f"region masks for {len(x.region_masks)} images but {len(x.images)} images", input="region_masks")
    for i, (img, masks) in enumerate(zip(x.images, x.region_masks)):
        if len(masks) != len(x.tokens):
            raise UnconfusedError(f"image {i} has {len(masks)} region masks for {len(x.tokens)} concepts", input="region_masks")
        for k, m in enumerate(masks):  # (a mask for a concept the prompt does not name is never read)
            if m is not None and x.tokens[k] in x.present[i] and tuple(m.shape) != tuple(img.shape[:2]):
                raise UnconfusedError(f"region mask {k} of image {i} is {m.shape[-1]}x{m.shape[-2]} but the "
                                      f"image is {img.shape[1]}x{img.shape[0]}", input="region_masks")
def evaluate(images: Sequence[torch.Tensor], prompts: Sequence[str], references: Sequence[Reference], clip, *,
             dino=None, region_masks: Sequence[Sequence[torch.Tensor | None]] | None = None,
             settings: EvalSettings | None = None) -> EvalReport:
    """Every registered metric the inputs allow. `prompts` has one prompt per image; `region_masks[i][k]`
    is where concept k should be in image i (None: not there)."""
    s = settings or EvalSettings()
    x = EvalInputs(list(images), list(prompts), list(references), clip, dino, region_masks, s)
    _check_inputs(x)
    report = EvalReport(tokens=x.tokens)
    report.settings = {"convention": s.convention, "convention_text": CONVENTIONS[s.convention],
                       "text_mode": s.text_mode, "text_mode_text": TEXT_MODES[s.text_mode],
                       "clip": getattr(clip, "name", str(clip)), "dino": getattr(dino, "name", None),
                       "region_threshold": s.region_threshold}
    with host.progress(len(METRICS), desc="evaluating") as bar:
        for m in METRICS.values():
            host.check_cancel()
            m.fn(x, report)
            bar.update()
    for k, token in enumerate(x.tokens):
        if not x.naming(k):
            report.notes.append(f"no image's prompt names {token}: its alignment is not measured")
    for m in METRICS.values():  # a per-concept metric's mean over the concepts, as concept "all"
        for name in (m.name, *m.rows) if m.per_concept else ():
            vals = [r["value"] for r in report.rows if r["metric"] == name and r["concept"] != "all"]
            if vals:
                report.add(name, sum(vals) / len(vals), n=len(vals), model=x.dino_name if name == "dino" else
                           x.clip_name, note="mean over concepts")
    return report


def metrics_page() -> str:
    """docs/metrics.md: every metric of the report, from its declaration above."""
    out = ["# Metrics", "",
           "Generated by `python scripts/gen_docs.py metrics` from the metric declarations in `engine/evaluation/metrics.py`",
           "(one `@metric` function each). The Evaluate node, `python -m unconfused eval` and the benchmarks report",
           "every metric its inputs allow; a per-concept metric also gets the mean over the concepts (concept",
           "`all`). Files: `report.json`, `metrics.csv` (metric, concept, value, n, model, note), `per_image.csv`.",
           "", "| metric (rows) | what it measures | source | needs |", "|---|---|---|---|"]
    for m in METRICS.values():
        names = ", ".join(f"`{n}`" for n in (m.name, *m.rows))
        per = " Per concept, and their mean." if m.per_concept else ""
        out.append(f"| **{m.title}**: {names} | {m.what}.{per} | {m.source} | {m.needs or '-'} |")
    out += ["", "Also: **Mask IoU** (`mask_iou`, the Mask IoU node): IoU of two mask batches at a threshold, the EM "
            "paper's check against hand-drawn masks.", ""]
    return "\n".join(out)


def prompts_for(text: str | Sequence[str], n: int, *, input: str = "prompts") -> list[str]:
    """One prompt for every image (one line), or one per image (one line each)."""
    lines = [ln.strip() for ln in (text.splitlines() if isinstance(text, str) else text) if str(ln).strip()]
    if not lines:
        raise UnconfusedError("no prompt: write the prompt the images were generated from (one line for all, or one "
                              "line per image)", input=input)
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise UnconfusedError(f"{len(lines)} prompt lines for {n} images; give one line for all images or exactly one "
                              "per image", input=input)
    return lines


def report_folder(base: str | Path, name: str) -> Path:
    """`<base>/<name>_00001`, the next free number, so no earlier report is overwritten."""
    from ..files import safe_name

    base = Path(base)
    stem = safe_name(name or "eval", input="name")
    used = [int(p.name.rsplit("_", 1)[1]) for p in base.glob(f"{stem}_*")
            if p.name.rsplit("_", 1)[1].isdigit()] if base.is_dir() else []
    return base / f"{stem}_{max(used, default=0) + 1:05d}"
