"""The flagship CLIF flow, headless: photos -> cut-outs -> augmentations -> CLIF text encoder ->
LoRA + tokens -> multi-concept pictures with the attention debugger -> report.

`python -m unconfused demo` runs it on built-in defaults (a small random SD model, a tiny CLIP,
two synthetic concepts with exact masks, a synthetic common-concept bank), so a fresh machine sees
every stage work in minutes on a CPU. The pictures of random models are noise: the run proves the
flow, the files and the numbers' plumbing, not the art. Give real files and photos
(`--ckpt`, `--clip`, `--sam`, `--concept`) for real results. Each stage resumes: rerun the command
and finished stages return at once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine import host
from ..engine.concepts import Concept, ConceptSet, concept_from_folder, make_concept_set
from ..engine.errors import UnconfusedError
from ..engine.files import atomic_save_image, atomic_write_json
from .smoke import ConceptSpec, synthetic_concept

NODE = "demo"


@dataclass
class FlowSettings:
    workdir: Path = Path("unconfused-demo")
    ckpt: Path | None = None  # default: the built-in demo model
    clip: Path | None = None  # an open_clip checkpoint (image + text towers); default: the tiny demo CLIP
    sam: Path | None = None  # a SAM checkpoint: cut-outs of user photos (and R-Aug with --clip)
    concepts: list[ConceptSpec] = field(default_factory=list)  # default: two synthetic concepts
    resolution: int = 64
    canvas: int = 128
    global_pairs: int = 24
    region_pairs: int = 0
    mix_per_pair: int = 12
    clif_steps: int = 30
    lora_steps: int = 40
    sample_steps: int = 20
    prompt: str = ""  # default: "a photo of <first> and <second>"
    seed: int = 0
    name: str = "demo"  # the runs <name>-clif and <name>-lora, the dataset <name>
    resume: str = "auto"  # "restart": train every stage again


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
    if not s.concepts:
        specs = [("<red-thing>", "ball"), ("<blue-thing>", "box")]
        made = []
        for i, (token, cls) in enumerate(specs):
            images, masks = synthetic_concept(i, 4, 96, s.seed)
            made.append(Concept(token, cls, images, masks=masks))
        return make_concept_set(made, node=NODE)
    concepts = []
    for spec in s.concepts:
        concepts.append(concept_from_folder(spec.folder, spec.token, spec.class_word, node=NODE, input="--concept"))
    if sam_model is None:
        raise UnconfusedError("your photos need cut-outs: give --sam (a SAM checkpoint, e.g. sam_vit_b_01ec64.pth) "
                              "and --clip (an open_clip checkpoint)", node=NODE, input="--sam")
    from ..engine.sam import concept_cutout

    out = []
    for c in concepts:
        choices, _ = concept_cutout(sam_model, c.images, c.class_word, scorer, node=NODE)
        out.append(Concept(c.token, c.class_word, c.images, masks=[ch.mask for ch in choices], names=c.names,
                           captions=c.captions))
    return make_concept_set(out, node=NODE)


def run(s: FlowSettings) -> dict:
    """The whole flow; writes `<workdir>/report.json`, `samples.png`, `attention.png`."""
    from ..engine import sampling as S
    from ..engine.augment import AugmentSettings, bank_from_folder, build_dataset
    from ..engine.clip_scoring import load_clip
    from ..engine.clip_tower import tower_from_scorer
    from ..engine.dataset import Dataset
    from ..engine.demo_model import write_demo_bank, write_demo_clip, write_demo_diffusers_folder
    from ..engine.models import load_model
    from .clif import ClifSettings, train_clif
    from .lora import LoraSettings, train_lora

    work = Path(s.workdir).resolve()
    host.configure(models_dir=work / "models", output_dir=work / "output", temp_dir=work / "temp")
    (work / "temp").mkdir(parents=True, exist_ok=True)
    st = Stages()
    ckpt = s.ckpt or write_demo_diffusers_folder(work / "models" / "diffusers" / "unconfused-demo")
    bundle = st.run("load model", load_model, ckpt)
    clip_path = s.clip or write_demo_clip(work / "models" / "clip_vision")
    scorer = st.run("load clip", load_clip, clip_path)
    sam_model = None
    if s.sam:
        from ..engine.sam import load_sam

        sam_model = st.run("load sam", load_sam, s.sam)
    cs = st.run("concepts and cut-outs", _concepts, s, sam_model, scorer)
    st.note("concepts and cut-outs", concepts={c.token: {"class_word": c.class_word, "photos": len(c.images)}
                                               for c in cs.concepts})

    bank = bank_from_folder(write_demo_bank(work / "bank"), node=NODE, input="bank")
    aug = AugmentSettings(seed=s.seed, canvas=s.canvas, global_pairs=s.global_pairs, mix_per_pair=s.mix_per_pair,
                          region_pairs=s.region_pairs if sam_model is not None else 0)
    proposer = labeller = None
    if aug.region_pairs:
        from ..engine.regions import region_tools

        proposer, labeller = region_tools(sam_model, scorer, node=NODE)
    from ..engine.files import safe_name

    name = safe_name(s.name, input="--name", node=NODE)
    if s.resume not in ("auto", "restart"):
        raise UnconfusedError(f"'{s.resume}' is not auto or restart", node=NODE, input="--resume")
    built = st.run("augmentations", build_dataset, cs, work / "output" / "unconfused" / "datasets" / name, aug,
                   bank=bank, proposer=proposer, labeller=labeller, node=NODE)
    st.note("augmentations", pairs=built.counts)
    dataset = Dataset(built.folder, node=NODE)

    clif = st.run("CLIF text encoder", train_clif, bundle, dataset, tower_from_scorer(scorer),
                  ClifSettings(name=f"{name}-clif", steps=s.clif_steps, batch_size=8, warmup_steps=0,
                               checkpoint_every=0, seed=s.seed, holdout=0.2, resume=s.resume))
    st.note("CLIF text encoder", resumed_from=clif.resumed_from, metrics=clif.metrics, exports={k: v.name for k, v in clif.exports.items()})

    from ..engine.training_data import examples_from_concept_set

    examples = examples_from_concept_set(cs, node=NODE) + list(dataset.examples(("mix",)))
    lora = st.run("LoRA + tokens", train_lora, clif.bundle, examples,
                  LoraSettings(name=f"{name}-lora", steps=s.lora_steps, resolution=s.resolution, checkpoint_every=0,
                               seed=s.seed, resume=s.resume), class_words={c.token: c.class_word for c in cs.concepts})
    st.note("LoRA + tokens", resumed_from=lora.resumed_from, final_loss=lora.losses[-1], exports={k: v.name for k, v in lora.exports.items()})

    tokens = [c.token for c in cs.concepts]
    prompt = s.prompt or f"a photo of {tokens[0]} and {tokens[1] if len(tokens) > 1 else 'a friend'}"
    # sampling and evaluation: done once per (trained weights, prompt, settings); a rerun reads the result
    key = _stage_key(lora.exports, prompt, s)
    done = _read_stage(work, "sample", key)
    if done is None or not all((work / f).exists() for f in ("samples.png", "attention.png", "eval")):
        res = st.run("sample", S.sample, lora.bundle, prompt, steps=s.sample_steps, width=s.resolution * 2,
                     height=s.resolution * 2, seed=s.seed, batch_size=2, debug_attention=True, node=NODE)
        from ..engine.concepts import tensor_to_pil
        from ..engine.preview import grid

        atomic_save_image(work / "samples.png", grid([tensor_to_pil(i) for i in res.images],
                                                     [prompt] * len(res.images)))
        atomic_save_image(work / "attention.png", res.overlay())
        done = {"prompt": prompt, "attention_tokens": res.tokens, "attention_overlap": _attention_overlap(res.maps),
                "warnings": res.warnings}
        evaluation = st.run("evaluate", _evaluate, lora.bundle, cs, scorer, res, prompt, s, work / "eval")
        _write_stage(work, "sample", key, {"sample": done, "evaluate": evaluation})
        done = {"sample": done, "evaluate": evaluation}
    else:
        st.note("sample", seconds=0.0, reused=True)
        st.note("evaluate", seconds=0.0, reused=True)
    st.note("sample", **done["sample"])
    st.note("evaluate", **done["evaluate"])

    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()
                           if k != "concepts"},
              "model": bundle.name, "family": bundle.family, **st.report,
              "files": {"samples": str(work / "samples.png"), "attention": str(work / "attention.png"),
                        "dataset": str(built.folder), "clif_run": str(clif.run_dir), "lora_run": str(lora.run_dir),
                        "evaluation": str(work / "eval")}}
    atomic_write_json(work / "report.json", json.loads(json.dumps(report, default=str)))
    return report


def _stage_key(exports: dict, prompt: str, s: FlowSettings) -> str:
    """What the pictures depend on: the trained tensors (by name and bytes: a re-export may order a
    file's header differently), the prompt, the sampling settings."""
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256(json.dumps([prompt, s.sample_steps, s.resolution, s.seed]).encode())
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


def _evaluate(bundle, cs: ConceptSet, scorer, res, prompt: str, s: FlowSettings, folder: Path) -> dict:
    """The papers' metrics on the pictures: the two-concept prompt's images (their attention maps
    give the confusion matrix) plus one single-concept picture per concept (CLIP-I single vs multi)."""
    from ..engine import metrics as M
    from ..engine import sampling as S

    tokens = [c.token for c in cs.concepts]
    images, prompts = list(res.images), [prompt] * len(res.images)
    regions = [[res.maps[i][res.tokens.index(t)] if res.maps is not None and t in res.tokens else None
                for t in tokens] for i in range(len(res.images))]
    for t in tokens:
        single = f"a photo of {t}"
        r = S.sample(bundle, single, steps=s.sample_steps, width=s.resolution * 2, height=s.resolution * 2,
                     seed=s.seed, batch_size=1, node=NODE)
        images.append(r.images[0])
        prompts.append(single)
        regions.append([None] * len(tokens))
    refs = [M.Reference(c.token, c.class_word, c.images, c.masks) for c in cs.concepts]
    report = M.evaluate(images, prompts, refs, scorer, region_masks=regions, node=NODE)
    report.write(folder)
    return {"convention": report.settings["convention_text"], "rows": {
        f"{r['metric']}[{r['concept']}]": r["value"] for r in report.rows if r["concept"] == "all"},
        "confusion": report.confusion.tolist() if report.confusion is not None else None}


def _attention_overlap(maps) -> float | None:
    """How much the first two tokens' attention maps overlap (IoU of the maps above half their
    maximum, mean over images): lower = the concepts went to different places."""
    if maps is None or maps.shape[1] < 2:
        return None
    from ..engine.regions import iou

    return round(sum(iou(a, b) for a, b in zip(maps[:, 0], maps[:, 1])) / maps.shape[0], 4)


def format_report(report: dict) -> str:
    lines = [f"model: {report['model']} ({report['family']})"]
    for name, info in report["stages"].items():
        extra = {k: v for k, v in info.items() if k != "seconds"}
        lines.append(f"- {name}: {info.get('seconds', 0):.1f} s" + (f"  {json.dumps(extra, default=str)[:300]}"
                                                                     if extra else ""))
    lines += [f"{k}: {v}" for k, v in report["files"].items()]
    return "\n".join(lines)
