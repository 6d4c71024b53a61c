"""The flagship CLIF flow, headless: photos -> cut-outs -> augmentations -> CLIF text encoder ->
LoRA + tokens -> multi-concept pictures with the attention debugger -> report.

`python -m unconfused demo` runs it on built-in defaults: the toy world (engine/evaluation/toyworld.py) - its
miniature SD 1.x model trained on coloured shapes, its CLIP, two personal concepts it has never
seen (a purple striped ball and an orange striped ball, with exact masks) and a common-concept bank
of the world's objects - so a fresh machine sees every stage work, and the pictures show objects,
in a few minutes on a CPU. The toy world's oracle measures the confusion of the two concepts before
CLIF (the same LoRA + tokens trained on the original text encoder) and after. Give real files and
photos (`--ckpt`, `--clip`, `--sam`, `--concept`) for real results: then the run takes a preset
(`quick` unless `--preset` says otherwise; the trainers' values from engine/presets.py, the demo's
counts from DEMO_VALUES) at the model family's native resolution, draws the common-concept bank with
the user's model (cached per model), makes R-Aug pairs when SAM is given, and says after the first
steps of each stage how long the stage will take (`make_plan` is the whole plan; report.json keeps
it). Each stage resumes: rerun the command and finished stages return at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from ..engine import host
from ..engine.data.concepts import Concept, ConceptSet, concept_from_folder, make_concept_set
from ..engine.errors import UnconfusedError
from ..engine.files import atomic_save_image, atomic_write_json
from ..engine.data.synthetic import synthetic_concept
from .smoke import ConceptSpec

NODE = "demo"


PRESETS = ("quick", "paper", "custom")
BUILTIN = "built-in"  # no --ckpt and no --preset: the fast run on the toy world (the README's main job)
STAGES = ("clif", "lora", "augment", "bank")  # what `--set STAGE.KEY=VALUE` may name
# the demo's own settings a job's [settings] or `--set KEY=VALUE` may give (the options' names)
OWN_NUMBERS = ("resolution", "pairs", "region_pairs", "bank_images", "clif_steps", "lora_steps", "sample_steps", "seed",
               "estimate_after", "oracle_images")
OWN_TEXTS = ("preset", "prompt", "name", "resume")

# The demo's own counts per preset (the trainers' settings come from engine/presets.py): G-Aug pairs,
# R-Aug pairs (only with --sam) and images per common concept of the bank the base model draws.
# paper: CLIF 4.1 (~40,000 G-Aug + ~10,000 R-Aug pairs) and its appendix (G-Aug step 2: 100 common
# concepts x 20 images);
# quick: ours, a bank of 100 concepts x 4 images (10-15 min at 25 steps, estimate) and 2,500 pairs
# (CLIF's quick 3000 x 64 sees each ~75 times; the paper: 200 epochs); custom: the Augment node's defaults.
DEMO_VALUES = {"paper": {"pairs": 40000, "region_pairs": 10000, "bank_images": 20},
               "quick": {"pairs": 2000, "region_pairs": 500, "bank_images": 4},
               "custom": {"pairs": 4000, "region_pairs": 1000, "bank_images": 4}}


@dataclass
class FlowSettings:
    workdir: Path = Path("unconfused-demo")
    ckpt: Path | None = None  # default: the toy world's model (engine/evaluation/toyworld_weights/toy-sd)
    clip: Path | None = None  # an open_clip checkpoint (image + text towers); default: the toy CLIP (without
    # --ckpt) or the tiny random demo CLIP (with it)
    sam: Path | None = None  # a SAM checkpoint: cut-outs of user photos and R-Aug pairs
    concepts: list[ConceptSpec] = field(default_factory=list)  # default: the toy world's two concepts
    preset: str = ""  # quick | paper | custom; "": quick with --ckpt, the fast built-in run without
    resolution: int = 0  # 0: 64 built-in, else the model family's native size
    pairs: int | None = None  # G-Aug pairs (None: the preset's)
    region_pairs: int | None = None  # R-Aug pairs, made only with --sam (None: the preset's)
    bank_images: int | None = None  # images per common concept, drawn by the base model (None: the preset's)
    clif_steps: int | None = None
    lora_steps: int | None = None
    sample_steps: int = 20
    prompt: str = ""  # default: "a photo of <first> and <second>"
    seed: int = 0
    name: str = "demo"  # the runs <name>-clif and <name>-lora, the dataset <name>
    resume: str = "auto"  # "restart": train every stage again
    overrides: dict = field(default_factory=dict)  # "clif.batch_size" -> value (--set / a job's [settings])
    estimate_after: int = 5  # steps measured for the time estimate of each training stage
    oracle_images: int = 12  # toy world only: pictures per prompt the oracle measures, before and after CLIF


@dataclass
class Plan:
    """What the run does: every stage's effective settings (report.json keeps it)."""
    mode: str  # BUILTIN or the preset
    resolution: int
    sample_size: int
    augment: object  # AugmentSettings
    bank: object | None  # BankSpec, or None: the built-in synthetic bank
    clif: object  # ClifSettings
    lora: object  # LoraSettings
    sampling: dict = field(default_factory=dict)  # the sampler's settings beyond its defaults (the toy world's)

    def summary(self) -> dict:
        return json.loads(json.dumps({"mode": self.mode, "resolution": self.resolution, "sample_size": self.sample_size,
                                      "augment": asdict(self.augment), "bank": asdict(self.bank) if self.bank else None,
                                      "clif": asdict(self.clif), "lora": asdict(self.lora),
                                      "sampling": self.sampling}, default=str))


def _split_overrides(overrides: dict) -> dict[str, dict]:
    """`{"clif.batch_size": 4}` -> `{"clif": {"batch_size": 4}}`; nested tables pass through."""
    out: dict[str, dict] = {k: {} for k in STAGES}
    for key, value in (overrides or {}).items():
        stage, sep, name = str(key).partition(".")
        if stage in STAGES and not sep and isinstance(value, dict):
            out[stage].update(value)
            continue
        if stage not in STAGES or not name:
            raise UnconfusedError(f"'{key}' is neither a setting of the demo ({', '.join(OWN_NUMBERS + OWN_TEXTS)}) "
                                  f"nor STAGE.KEY with a stage of {', '.join(STAGES)}, e.g. clif.batch_size=32 or "
                                  "lora.rank=16", input="--set")
        out[stage][name] = value
    return out


@host.named(NODE)
def make_plan(s: FlowSettings, native: int, with_sam: bool) -> Plan:
    """The stages' settings from the flags, the preset and the overrides (explicit values win).
    native: the model family's native resolution."""
    from ..engine.data.augment.build import AugmentSettings
    from ..engine.data.augment.bank import BankSpec
    from ..engine.presets import apply_preset
    from ..trainers.clif import ClifSettings
    from ..trainers.loop import settings_from_dict
    from ..trainers.lora import LoraSettings

    mode = s.preset or (BUILTIN if s.ckpt is None else "quick")
    if mode not in (*PRESETS, BUILTIN):
        raise UnconfusedError(f"'{s.preset}' is not a preset of the demo; choose one of {', '.join(PRESETS)}", input="--preset")
    if s.resume not in ("auto", "restart"):
        raise UnconfusedError(f"'{s.resume}' is not auto or restart", input="--resume")
    if s.resolution and (s.resolution < 64 or s.resolution % 64):
        raise UnconfusedError(f"--resolution {s.resolution} is not a multiple of 64 (at least 64), e.g. 512", input="--resolution")
    over = _split_overrides(s.overrides)
    common = {"seed": s.seed, "resume": s.resume}

    def steps(value):
        return {} if value is None else {"steps": value}

    sampling = {}
    if mode == BUILTIN:  # the values that suit the toy model (64 px), any of them changeable
        from ..engine.evaluation import toyworld as tw

        res = s.resolution or tw.SIZE
        aug = {**tw.AUGMENT, "canvas": res}
        clif = dict(tw.CLIF)
        lora = {**tw.LORA, "resolution": res}
        sampling = {k: v for k, v in tw.SAMPLING.items() if k != "steps"}
        preset, sample_size, bank_images = "custom", res, s.bank_images
    else:
        res = s.resolution or native
        values = DEMO_VALUES[mode]
        aug = {"canvas": res, "global_pairs": values["pairs"], "region_pairs": values["region_pairs"]}
        clif, lora = {}, {}
        preset, sample_size, bank_images = mode, res, \
            values["bank_images"] if s.bank_images is None else s.bank_images
    if s.pairs is not None:
        aug["global_pairs"] = s.pairs
    if s.region_pairs is not None:
        aug["region_pairs"] = s.region_pairs
    aug = {**aug, "seed": s.seed, **over["augment"]}
    if not with_sam:
        aug["region_pairs"] = 0  # R-Aug needs SAM's region proposals
    augment = settings_from_dict(AugmentSettings, aug, NODE)
    bank = None
    if bank_images is not None or over["bank"]:
        bank = settings_from_dict(BankSpec, {"per_concept": 4 if bank_images is None else bank_images,
                                             "seed": s.seed, "size": res, **over["bank"]}, NODE)
        if bank.per_concept < 1:
            raise UnconfusedError("--bank-images must be 1 or more", input="--bank-images")
    clif = {**clif, **common, "name": f"{s.name}-clif", **steps(s.clif_steps), **over["clif"]}
    lora = {**lora, **common, "name": f"{s.name}-lora", "resolution": res, **steps(s.lora_steps), **over["lora"]}
    lora = apply_preset(LoraSettings, preset, lora)
    return Plan(mode, lora.resolution, sample_size, augment, bank, apply_preset(ClifSettings, preset, clif),
                lora, sampling)


class Stages:
    """Times and notes per stage, written into the report."""

    def __init__(self):
        self.report: dict = {"stages": {}}

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.report["stages"][name] = {"seconds": round(time.perf_counter() - t0, 2)}
        return out

    def note(self, name: str, **values) -> None:
        self.report["stages"].setdefault(name, {}).update(values)


def _concepts(s: FlowSettings, sam_model, scorer) -> ConceptSet:
    if not s.concepts and s.ckpt is None:  # the toy world's two personal concepts, with exact masks
        from ..engine.evaluation import toyworld as tw

        return make_concept_set([Concept(token, cls, images, masks=masks)
                                 for token, cls, images, masks in tw.demo_concepts(5, s.seed)])
    if not s.concepts:  # on the user's model: two synthetic concepts
        specs = [("<red-thing>", "ball"), ("<blue-thing>", "box")]
        made = []
        for i, (token, cls) in enumerate(specs):
            images, masks = synthetic_concept(i, 4, 96, s.seed)
            made.append(Concept(token, cls, images, masks=masks))
        return make_concept_set(made)
    concepts = []
    for spec in s.concepts:
        concepts.append(concept_from_folder(spec.folder, spec.token, spec.class_word, input="--concept"))
    if sam_model is None:
        raise UnconfusedError("your photos need cut-outs: give --sam (a SAM checkpoint, e.g. sam_vit_b_01ec64.pth) "
                              "and --clip (an open_clip checkpoint)", input="--sam")
    from ..engine.vision.sam import concept_cutout

    out = []
    for c in concepts:
        choices, _ = concept_cutout(sam_model, c.images, c.class_word, scorer)
        out.append(Concept(c.token, c.class_word, c.images, masks=[ch.mask for ch in choices], names=c.names,
                           captions=c.captions))
    return make_concept_set(out)


class StepTimer:
    """The time estimate of a stage from its first steps, out of the messages the stages send (the
    trainers' `train` step messages, trainers/loop.py; the bank's `augment.bank` image counts):
    seconds per step measured after the first message (which carries the warm-up), said once per
    stage: "CLIF: 1.90 s/step -> about 31 min for 1000 steps"."""

    EVENTS: ClassVar[dict] = {"unconfused.train": ("step", "step"), "unconfused.augment.bank": ("done", "image")}

    def __init__(self, after: int, say):
        self.after, self.say = max(1, int(after)), say
        self.label, self.t_begin, self.first, self.estimates = None, 0.0, None, {}

    def begin(self, label: str) -> None:
        self.label, self.t_begin, self.first = label, time.perf_counter(), None

    def end(self) -> None:
        self.label = None

    def __call__(self, event: str, data: dict) -> None:
        if event not in self.EVENTS or self.label is None or self.label in self.estimates:
            return
        key, unit = self.EVENTS[event]
        now, step, total = time.perf_counter(), int(data.get(key, 0)), int(data.get("total", 0))
        if self.first is None:
            self.first = (now, step)
            if step < total:
                return
            per, over = (now - self.t_begin) / max(step, 1), f"{step} {unit}(s)"  # a one-message run
        else:
            t0, s0 = self.first
            if step - s0 < self.after and step < total:
                return
            per, over = (now - t0) / max(step - s0, 1), f"{unit}s {s0 + 1}-{step}"
        minutes = per * total / 60
        span = f"about {minutes:.0f} min" if minutes >= 1 else f"about {per * total:.1f} s"
        line = f"{self.label}: {per:.2f} s/{unit} -> {span} for {total} {unit}s (measured over {over})"
        self.estimates[self.label] = {"seconds_per_" + unit: round(per, 4), "total": total,
                                      "estimated_minutes": round(minutes, 2), "line": line}
        self.say(line)


def _say(line: str) -> None:
    """A line on stderr above the progress bars (tqdm's write clears the bar first)."""
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


@host.named(NODE)
def run(s: FlowSettings, say=_say) -> dict:
    """The whole flow; writes `<workdir>/report.json`, `samples.png`, `attention.png`."""
    from ..engine.models import sampling as S
    from ..engine.evaluation import toyworld as tw
    from ..engine.data.augment.bank import bank_from_folder, generate_bank
    from ..engine.data.augment.build import build_dataset
    from ..engine.vision.clip_zero_shot import load_clip
    from ..engine.vision.clip_image_tower import tower_from_scorer
    from ..engine.data.augmented_dataset import Dataset
    from ..engine.models.demo import write_demo_clip
    from ..engine.models.loading import load_model
    from ..trainers.clif import train_clif
    from ..trainers.lora import train_lora

    work = Path(s.workdir).resolve()
    host.configure(models_dir=work / "models", output_dir=work / "output", temp_dir=work / "temp")
    (work / "temp").mkdir(parents=True, exist_ok=True)
    from ..engine.files import safe_name

    name = safe_name(s.name, input="--name")
    make_plan(s, 512, s.sam is not None)  # bad settings are refused before anything loads
    st = Stages()
    toy = s.ckpt is None  # the built-in defaults: the toy world, measured by its oracle
    ckpt = tw.MODEL_DIR if toy else s.ckpt
    bundle = st.run("load model", load_model, ckpt)
    plan = make_plan(s, bundle.spec.default_resolution(bundle), s.sam is not None)
    bank_text = f"{plan.bank.per_concept} images x {len(plan.bank.phrases)} concepts drawn by the model" \
        if plan.bank else "built-in shapes"
    say(f"demo plan ({plan.mode}): {plan.resolution} px, {plan.augment.global_pairs} G-Aug + "
        f"{plan.augment.region_pairs} R-Aug pairs, bank {bank_text}, CLIF {plan.clif.steps} steps x "
        f"{plan.clif.batch_size}, LoRA {plan.lora.steps} steps")
    clip_path = s.clip or (tw.CLIP_PATH if toy else write_demo_clip(work / "models" / "clip_vision"))
    scorer = st.run("load clip", load_clip, clip_path)
    sam_model = None
    if s.sam:
        from ..engine.vision.sam import load_sam

        sam_model = st.run("load sam", load_sam, s.sam)
    cs = st.run("concepts and cut-outs", _concepts, s, sam_model, scorer)
    st.note("concepts and cut-outs", concepts={c.token: {"class_word": c.class_word, "photos": len(c.images)}
                                               for c in cs.concepts})

    timer = StepTimer(s.estimate_after, say)
    host.add_listener(timer)  # (host has no remove_listener: `end()` makes it deaf after the run)
    if plan.bank is None:
        bank = bank_from_folder(tw.write_toy_bank(work / "bank", seed=s.seed), input="bank")
    else:  # drawn by the user's model, cached per model (by its hash), prompt, seed and size: a rerun reuses it
        timer.begin("common-concept bank")
        try:
            bank = st.run("common-concept bank", generate_bank, bundle, plan.bank)
        finally:
            timer.end()
        st.note("common-concept bank", images=len(bank), folder=str(bank.cache_dir))
    proposer = labeller = None
    if plan.augment.region_pairs:
        from ..engine.vision.regions import region_tools

        proposer, labeller = region_tools(sam_model, scorer)
    built = st.run("augmentations", build_dataset, cs, work / "output" / "unconfused" / "datasets" / name,
                   plan.augment, bank=bank, proposer=proposer, labeller=labeller)
    st.note("augmentations", pairs=built.counts)
    dataset = Dataset(built.folder)

    try:
        timer.begin("CLIF")
        clif = st.run("CLIF text encoder", train_clif, bundle, dataset, tower_from_scorer(scorer), plan.clif)
        st.note("CLIF text encoder", resumed_from=clif.resumed_from, metrics=clif.metrics,
                exports={k: v.name for k, v in clif.exports.items()})

        from ..engine.data.training_examples import examples_from_concept_set

        examples = examples_from_concept_set(cs) + list(dataset.examples(("mix",)))
        timer.begin("LoRA")
        lora = st.run("LoRA + tokens", train_lora, clif.bundle, examples, plan.lora,
                      class_words={c.token: c.class_word for c in cs.concepts})
        st.note("LoRA + tokens", resumed_from=lora.resumed_from, final_loss=lora.losses[-1],
                exports={k: v.name for k, v in lora.exports.items()})
    finally:
        timer.end()
    for label, stage in (("common-concept bank", "common-concept bank"), ("CLIF", "CLIF text encoder"),
                         ("LoRA", "LoRA + tokens")):
        if label in timer.estimates:
            st.note(stage, estimate=timer.estimates[label]["line"])

    tokens = [c.token for c in cs.concepts]
    # the toy model learnt its concepts as "<token> ball" and every picture with a ground: its prompts name both
    phrase = {c.token: f"{c.token} {c.class_word}" if toy else c.token for c in cs.concepts}
    where = f" on {tw.DEMO_GROUND}" if toy else ""
    prompt = s.prompt or (f"a photo of {phrase[tokens[0]]} and {phrase[tokens[1]] if len(tokens) > 1 else 'a friend'}"
                          + where)
    # sampling and evaluation: done once per (trained weights, prompt, settings); a rerun reads the result
    key = _stage_key(lora.exports, prompt, s, plan.sample_size, [plan.sampling, s.oracle_images] if toy else [])
    done = _read_stage(work, "sample", key)
    if done is None or not all((work / f).exists() for f in ("samples.png", "attention.png", "eval")):
        res = st.run("sample", S.sample, lora.bundle, prompt, steps=s.sample_steps, width=plan.sample_size,
                     height=plan.sample_size, seed=s.seed, batch_size=4 if toy else 2, debug_attention=True, **plan.sampling)
        done = {"prompt": prompt, "attention_tokens": res.tokens, "attention_overlap": _attention_overlap(res.maps),
                "warnings": res.warnings}
        evaluation, singles = st.run("evaluate", _evaluate, lora.bundle, cs, scorer, res, prompt, s, work / "eval",
                                     plan, phrase, where)
        _write_pictures(work, res, prompt, singles)
        result = {"sample": done, "evaluate": evaluation}
        if toy:  # the oracle's measures before CLIF (same LoRA + tokens, original text encoder) and after
            result["oracle"] = st.run("oracle", _oracle_measures, bundle, lora.bundle, examples, plan, cs, s)
        _write_stage(work, "sample", key, result)
        done = result
    else:
        for stage in ("sample", "evaluate") + (("oracle",) if "oracle" in done else ()):
            st.note(stage, seconds=0.0, reused=True)
    st.note("sample", **done["sample"])
    st.note("evaluate", **done["evaluate"])
    if "oracle" in done:
        st.note("oracle", **done["oracle"])

    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()
                           if k != "concepts"}, "plan": plan.summary(),
              "estimates": {k: v["line"] for k, v in timer.estimates.items()},
              "model": bundle.name, "family": bundle.family, **st.report,
              "files": {"samples": str(work / "samples.png"), "attention": str(work / "attention.png"),
                        "dataset": str(built.folder), "clif_run": str(clif.run_dir), "lora_run": str(lora.run_dir),
                        "evaluation": str(work / "eval")}}
    atomic_write_json(work / "report.json", json.loads(json.dumps(report, default=str)))
    return report


def _stage_key(exports: dict, prompt: str, s: FlowSettings, size: int, extra: list) -> str:
    """What the pictures depend on: the trained tensors (by name and bytes: a re-export may order a
    file's header differently), the prompt, the sampling settings."""
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256(json.dumps([prompt, s.sample_steps, size, s.seed, *extra]).encode())
    for k, path in sorted(exports.items()):
        with safe_open(str(path), "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h.update(f"{k}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _read_stage(work: Path, stage: str, key: str) -> dict | None:
    try:
        done = json.loads((work / "stages" / f"{stage}.json").read_text())
    except (OSError, ValueError):
        return None
    return done.get("result") if isinstance(done, dict) and done.get("key") == key else None


def _write_stage(work: Path, stage: str, key: str, result: dict) -> None:
    atomic_write_json(work / "stages" / f"{stage}.json",
                      {"key": key, "result": json.loads(json.dumps(result, default=str))})


def _evaluate(bundle, cs: ConceptSet, scorer, res, prompt: str, s: FlowSettings, folder: Path, plan: Plan,
              phrase: dict[str, str], where: str) -> tuple[dict, list]:
    """The papers' metrics on the pictures: the two-concept prompt's images (their attention maps
    give the confusion matrix) plus one single-concept picture per concept (CLIP-I single vs multi).
    Returns the metrics and the single-concept pictures as (prompt, image)."""
    from ..engine.evaluation import metrics as M
    from ..engine.models import sampling as S

    tokens = [c.token for c in cs.concepts]
    images, prompts = list(res.images), [prompt] * len(res.images)
    regions = [[res.maps[i][res.tokens.index(t)] if res.maps is not None and t in res.tokens else None
                for t in tokens] for i in range(len(res.images))]
    singles = []
    for t in tokens:
        single = f"a photo of {phrase[t]}{where}"
        r = S.sample(bundle, single, steps=s.sample_steps, width=plan.sample_size, height=plan.sample_size,
                     seed=s.seed, batch_size=1, **plan.sampling)
        images.append(r.images[0])
        prompts.append(single)
        regions.append([None] * len(tokens))
        singles.append((single, r.images[0]))
    refs = [M.Reference(c.token, c.class_word, c.images, c.masks) for c in cs.concepts]
    report = M.evaluate(images, prompts, refs, scorer, region_masks=regions)
    report.write(folder)
    return {"convention": report.settings["convention_text"], "rows": {
        f"{r['metric']}[{r['concept']}]": r["value"] for r in report.rows if r["concept"] == "all"},
        "confusion": report.confusion.tolist() if report.confusion is not None else None}, singles


def _write_pictures(work: Path, res, prompt: str, singles: list) -> None:
    """samples.png: the two-concept pictures, then each concept alone; attention.png: the debugger's
    overlay. Small pictures (the toy world's 64 px) are enlarged 4x, pixels kept sharp, to be seen."""
    import dataclasses

    import torch

    from ..engine.data.concepts import tensor_to_pil
    from ..engine.preview import grid

    scale = 4 if res.images.shape[1] < 128 else 1

    def big(x: torch.Tensor) -> torch.Tensor:  # [..., H, W] -> [..., H*scale, W*scale]
        return x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)

    pictures = list(res.images) + [img for _, img in singles]
    captions = [prompt] * len(res.images) + [p for p, _ in singles]
    atomic_save_image(work / "samples.png", grid([tensor_to_pil(big(i.permute(2, 0, 1)).permute(1, 2, 0))
                                                  for i in pictures], captions, cell=max(256, 64 * scale)))
    shown = dataclasses.replace(res, images=big(res.images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
                                maps=big(res.maps) if res.maps is not None else None)
    atomic_save_image(work / "attention.png", shown.overlay())


def _oracle_measures(base, trained, examples: list, plan: Plan, cs: ConceptSet, s: FlowSettings) -> dict:
    """The toy world's oracle on the two concepts: before CLIF = tokens + LoRA trained exactly as the
    run's (same examples, settings and seed) on the base model's own text encoder; after = the run's
    model (CLIF text encoder, then tokens + LoRA)."""
    from dataclasses import replace

    from ..engine.evaluation import toyworld as tw
    from ..engine.evaluation.oracle import Oracle
    from ..trainers.lora import train_lora

    concepts = {c.token: tw.DEMO_TOKENS[c.token] for c in cs.concepts if c.token in tw.DEMO_TOKENS}
    if len(concepts) != 2:
        return {"note": "the oracle measures the toy world's two built-in concepts only"}
    oracle = Oracle.load()
    before = train_lora(base, examples, replace(plan.lora, name=f"{plan.lora.name.removesuffix('-lora')}"
                                                                          "-baseline"),
                        class_words={c.token: c.class_word for c in cs.concepts})
    out = {"before": "tokens + LoRA on the original text encoder (no CLIF), same examples, settings and seed",
           "after": "CLIF text encoder, then tokens + LoRA", "images": s.oracle_images,
           "prompt": tw.pair_prompt(concepts, tw.DEMO_GROUND)}
    for when, bundle in (("before_clif", before.bundle), ("after_clif", trained)):
        out[when], _ = tw.measure_concepts(bundle, oracle, concepts, s.oracle_images, s.seed, s.sample_steps,
                                           ground=tw.DEMO_GROUND)
    return out


def _attention_overlap(maps) -> float | None:
    """How much the first two tokens' attention maps overlap (IoU of the maps above half their
    maximum, mean over images): lower = the concepts went to different places."""
    if maps is None or maps.shape[1] < 2:
        return None
    from ..engine.vision.regions import iou

    return round(sum(iou(a, b) for a, b in zip(maps[:, 0], maps[:, 1])) / maps.shape[0], 4)


def format_report(report: dict) -> str:
    lines = [f"model: {report['model']} ({report['family']})"]
    for name, info in report["stages"].items():
        extra = {k: v for k, v in info.items() if k != "seconds"}
        lines.append(f"- {name}: {info.get('seconds', 0):.1f} s" + (f"  {json.dumps(extra, default=str)[:300]}"
                                                                     if extra else ""))
    lines += _oracle_table(report["stages"].get("oracle", {}))
    lines += [f"{k}: {v}" for k, v in report["files"].items()]
    return "\n".join(lines)


ORACLE_ROWS = (("both", "both concepts present (colour, pattern, shape)"),
               ("both_colour", "both concepts present (colour)"),
               ("confusion_degree_colour", "confusion degree (colour; 0 = apart, 1 = confused or absent)"),
               ("leak_rate_colour", "leak rate (colour: a concept drawn in the other's colour)"),
               ("colour_fidelity", "each concept alone, drawn in its colour"),
               ("fidelity", "each concept alone, all attributes right"))


def _oracle_table(o: dict) -> list[str]:
    """The oracle's before/after CLIF table of the toy world's run, as text."""
    if "before_clif" not in o:
        return []
    lines = [f"oracle ({o['images']} pictures per prompt, '{o['prompt']}'):", f"  {'':64s} before CLIF  after CLIF"]
    for key, label in ORACLE_ROWS:
        lines.append(f"  {label:64s} {o['before_clif'][key]:11.2f}  {o['after_clif'][key]:10.2f}")
    lines.append(f"  before CLIF = {o['before']}")
    return lines
