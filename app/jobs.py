"""Headless jobs from a config file (JSON or TOML): what the CLI's training commands run.

A config names the model, the concepts and the trainer's settings:

    model = "models/checkpoints/v1-5-pruned-emaonly.safetensors"   # omitted: the built-in demo model
    concept_set = "output/unconfused/concept_sets/pets"           # a saved concept set folder, or:
    concepts = ["photos/alice:<alice>:woman", "photos/rex:<rex>:dog"]
    [settings]                                                      # the trainer's settings
    steps = 800
    name = "pets"

Relative paths are read from the config file's folder. `workdir` (default: the config's folder)
holds models/, output/ and temp/ as ComfyUI would.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from ..engine import host
from ..engine.data.concepts import (
    Concept,
    ConceptSet,
    concept_from_folder,
    load_concept_set,
    load_images_from_folder,
    make_concept_set,
    parse_concept_spec,
)
from ..engine.errors import UnconfusedError

KNOWN = {"model", "concept_set", "concepts", "settings", "preset", "workdir", "prediction", "precision",
         "dataset", "image_tower",  # the CLIF job
         "images", "ground_truth",  # the mask-EM job
         "prompt", "clip", "dino", "region_masks", "masks_a", "masks_b", "output",  # the eval job
         "sam"}  # the demo job




TEXT_KEYS = {"model", "concept_set", "workdir", "prediction", "precision", "dataset", "image_tower", "prompt", "clip",
             "dino", "region_masks", "masks_a", "masks_b", "output", "sam"}
TEXT_OR_LIST_KEYS = {"images", "ground_truth"}  # one file name or a list of them


def check_config_types(config: dict, name: str, *, node: str) -> None:
    """Refuse a value of the wrong type with a sentence naming the key and the type (a number where a
    path belongs, a table where a list belongs), before anything reads it."""
    def bad(key: str, want: str):
        raise UnconfusedError(f"'{key}' in {name} must be {want}, not {config[key]!r}", node=node, input=key)

    for key in TEXT_KEYS & set(config):
        if not isinstance(config[key], str):
            bad(key, "text (a path or a name)")
    for key in TEXT_OR_LIST_KEYS & set(config):
        v = config[key]
        if not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            bad(key, "a file name or a list of file names")
    if "settings" in config and not isinstance(config["settings"], dict):
        bad("settings", "a table of settings ([settings] in TOML, an object in JSON)")
    if "concepts" in config:
        v = config["concepts"]
        if isinstance(v, str):
            if node != "em" and v != "demo":
                bad("concepts", "a list of \"FOLDER:TOKEN:CLASS\" entries (or \"demo\" for the two built-in "
                                "concepts)")
        elif not isinstance(v, list):
            bad("concepts", "a list of \"FOLDER:TOKEN:CLASS\" entries or {folder, token, class_word} tables")
        elif node != "em":
            for spec in v:
                if isinstance(spec, dict):
                    missing = [k for k in ("folder", "token", "class_word") if not isinstance(spec.get(k), str)]
                    if missing:
                        raise UnconfusedError(f"the concept {spec!r} in {name} needs {', '.join(missing)} as text "
                                              "({folder = \"photos/alice\", token = \"<alice>\", class_word = "
                                              "\"woman\"})", node=node, input="concepts")
                elif not isinstance(spec, str):
                    raise UnconfusedError(f"the concept {spec!r} in {name} must be \"FOLDER:TOKEN:CLASS\" or a "
                                          "{folder, token, class_word} table", node=node, input="concepts")
        else:
            if not all(isinstance(x, str) for x in v):
                bad("concepts", "text lines (\"<token> class word\")")


def read_config(path: str | Path, overrides: list[str] | None = None, *, node: str) -> tuple[dict, Path]:
    from ..trainers.loop import CliText

    path = Path(path)
    if path.is_dir():
        raise UnconfusedError(f"{path} is a folder; give the job file itself (a .toml or .json file)", node=node,
                              input="--config")
    if not path.is_file():
        raise UnconfusedError(f"{path} does not exist", node=node, input="--config")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UnconfusedError(f"{path.name}: job files are TOML (.toml) or JSON (.json), not '{suffix or 'no suffix'}'"
                              "; rename or convert it", node=node, input="--config")
    try:
        text = path.read_text(encoding="utf-8")
        config = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UnconfusedError(f"{path.name} is not valid {suffix[1:].upper()}: {e}", node=node,
                              input="--config") from e
    except OSError as e:
        raise UnconfusedError(f"cannot read {path}: {e.strerror or e}", node=node, input="--config") from e
    if not isinstance(config, dict):
        raise UnconfusedError(f"{path.name} must hold an object of keys (model, concepts, settings, ...)", node=node,
                              input="--config")
    unknown = sorted(set(config) - KNOWN)
    if unknown:
        raise UnconfusedError(f"unknown keys {unknown} in {path.name}; known: {sorted(KNOWN)}", node=node,
                              input="--config")
    check_config_types(config, path.name, node=node)
    settings = dict(config.get("settings", {}))
    if "preset" in config:  # `preset = "paper"` at the top: a setting like the others ([settings] wins)
        settings.setdefault("preset", config.pop("preset"))
    for item in overrides or []:  # --set steps=10 --set name=x: parsed by the setting's declared type
        key, sep, value = item.partition("=")
        if not sep:
            raise UnconfusedError(f"'{item}' is not key=value", node=node, input="--set")
        settings[key.strip()] = CliText(value)
    config["settings"] = settings
    base = path.parent.resolve()
    if "workdir" in config and _path(base, config["workdir"]).exists() and not _path(base, config["workdir"]).is_dir():
        raise UnconfusedError(f"workdir {_path(base, config['workdir'])} is a file; give a folder (it holds models/, "
                              "output/ and temp/)", node=node, input="workdir")
    return config, base


def _job(section: str):
    """Run a job inside its section's name (host.running_node): every message raised below names
    the job ("[lora] ...") as a node's name its node."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with host.running_node(name=section):
                return fn(*args, **kwargs)
        return run
    return wrap


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def prepare_job(config: dict, base: Path):
    """Configure the host folders and return (model bundle, concept set)."""
    from ..engine.models.demo import write_demo_diffusers_folder
    from ..engine.models.loading import load_model

    workdir = _path(base, config.get("workdir", "."))
    host.configure(models_dir=workdir / "models", output_dir=workdir / "output", temp_dir=workdir / "temp")
    (workdir / "temp").mkdir(parents=True, exist_ok=True)
    if config.get("model"):
        model_path = _path(base, config["model"])
    else:
        model_path = write_demo_diffusers_folder(workdir / "models" / "diffusers" / "unconfused-demo")
    # frozen weights load in the run's precision, as the Load Checkpoint node does (SDXL in fp32 is 14 GB)
    dtype = host.default_dtype(host.device("auto"), config.get("settings", {}).get("precision", "auto"))
    bundle = load_model(model_path, prediction=config.get("prediction", "auto"), dtype=dtype)
    return bundle, concepts_from_config(config, base)


def concepts_from_config(config: dict, base: Path) -> ConceptSet:
    if config.get("concept_set"):
        return load_concept_set(_path(base, config["concept_set"]))
    specs = config.get("concepts")
    if not specs:
        raise UnconfusedError("the job names no concepts: give 'concepts' (a list of \"FOLDER:TOKEN:CLASS\") or "
                              "'concept_set' (a saved concept set folder); concepts = \"demo\" trains the two "
                              "built-in synthetic concepts", input="concepts")
    if specs == "demo":
        from ..engine.data.synthetic import synthetic_photos

        return make_concept_set([Concept("<red-thing>", "ball", synthetic_photos(0)),
                                 Concept("<blue-thing>", "box", synthetic_photos(1))])
    concepts = []
    for spec in specs:
        if isinstance(spec, str):
            folder, token, class_word = parse_concept_spec(spec, input="concepts")
            spec = {"folder": str(folder), "token": token, "class_word": class_word}
        concepts.append(concept_from_folder(_path(base, spec["folder"]), spec["token"], spec["class_word"],
                                            input="concepts"))
    return make_concept_set(concepts)


@_job("lora")
def run_lora(config_path: str | Path, overrides: list[str] | None = None) -> dict:
    from ..trainers.lora import LoraSettings, train_lora

    config, base = read_config(config_path, overrides, node="lora")
    settings = LoraSettings.from_dict(config["settings"])
    bundle, cs = prepare_job(config, base)
    result = train_lora(bundle, cs, settings)
    return {"steps": len(result.losses), "resumed_from": result.resumed_from, "final_loss": result.losses[-1],
            "run_dir": str(result.run_dir), "exports": {k: str(v) for k, v in result.exports.items()},
            "info": result.info()}


@_job("clif")
def run_clif(config_path: str | Path, overrides: list[str] | None = None) -> dict:
    """CLIF text-encoder job: `model`, `dataset` (an augmented dataset folder), `image_tower` (a file
    of models/clip_vision or models/clip under the workdir, or a path), optional `concept_set` or
    `concepts` for class words the dataset's manifest lacks, and [settings] (ClifSettings)."""
    from ..engine.models.demo import write_demo_diffusers_folder
    from ..engine.models.loading import load_model
    from ..trainers.clif import ClifSettings, resolve_tower, train_clif

    config, base = read_config(config_path, overrides, node="clif")
    settings = ClifSettings.from_dict(config["settings"])
    for key in ("dataset", "image_tower"):
        if not config.get(key):
            raise UnconfusedError(f"the CLIF job needs '{key}' in {Path(config_path).name}",
                                  input="--config")
    workdir = _path(base, config.get("workdir", "."))
    host.configure(models_dir=workdir / "models", output_dir=workdir / "output", temp_dir=workdir / "temp")
    (workdir / "temp").mkdir(parents=True, exist_ok=True)
    model_path = _path(base, config["model"]) if config.get("model") else \
        write_demo_diffusers_folder(workdir / "models" / "diffusers" / "unconfused-demo")
    bundle = load_model(model_path, prediction=config.get("prediction", "auto"))
    tower_path = _path(base, config["image_tower"])  # a path, or a file name inside models/clip_vision
    tower = resolve_tower(str(tower_path) if tower_path.is_file() else config["image_tower"])
    class_words = {}
    if config.get("concept_set") or config.get("concepts"):
        class_words = {c.token: c.class_word for c in concepts_from_config(config, base).concepts}
    result = train_clif(bundle, _path(base, config["dataset"]), tower, settings, class_words=class_words)
    return {"steps": len(result.losses), "resumed_from": result.resumed_from,
            "final_loss": result.losses[-1] if result.losses else None, "run_dir": str(result.run_dir),
            "exports": {k: str(v) for k, v in result.exports.items()}, "metrics": {
                k: v for k, v in result.metrics.items() if k in ("before", "after")}, "info": result.info()}


@_job("em")
def run_em(config_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Mask-EM job: `model`, `images` (one or a few image files holding several concepts), `concepts`
    (the node's lines: "<token> class word", "2: <token> class" for image 2 only; a list or one
    string), optional `ground_truth` (mask files, one per concept of each image, image by image in
    line order; only measured) and [settings] (EMSettings)."""
    from ..engine.data.concepts import pil_to_mask, pil_to_tensor
    from ..engine.models.demo import write_demo_diffusers_folder
    from ..engine.models.loading import load_model
    from ..trainers.em import EMSettings, make_scenes, train_em

    config, base = read_config(config_path, overrides, node="em")
    settings = EMSettings.from_dict(config["settings"])
    files = config.get("images") or []
    if isinstance(files, str):
        files = [files]
    lines = config.get("concepts") or ""
    if not files or not lines:
        raise UnconfusedError(f"the mask-EM job needs 'images' (image files) and 'concepts' (\"<token> class\" "
                              f"lines) in {Path(config_path).name}", input="--config")
    text = lines if isinstance(lines, str) else "\n".join(str(x) for x in lines)

    def read(name: str, what: str, as_mask: bool):
        from PIL import Image

        path = _path(base, name)
        if not path.is_file():
            raise UnconfusedError(f"{what} {path} does not exist", input="--config")
        try:
            with Image.open(path) as im:
                return pil_to_mask(im) if as_mask else pil_to_tensor(im)
        except Exception as e:  # PIL raises many types for damaged files
            raise UnconfusedError(f"cannot read {what} {path} ({e}); replace the file",
                                  input="--config") from e

    workdir = _path(base, config.get("workdir", "."))
    host.configure(models_dir=workdir / "models", output_dir=workdir / "output", temp_dir=workdir / "temp")
    (workdir / "temp").mkdir(parents=True, exist_ok=True)
    images = [read(f, "the image", False) for f in files]
    gt = [read(f, "the ground-truth mask", True) for f in config["ground_truth"]] if config.get("ground_truth") \
        else None
    scenes = make_scenes(images, text, gt)
    model_path = _path(base, config["model"]) if config.get("model") else \
        write_demo_diffusers_folder(workdir / "models" / "diffusers" / "unconfused-demo")
    bundle = load_model(model_path, prediction=config.get("prediction", "auto"))
    result = train_em(bundle, scenes, settings)
    masks_dir = result.run_dir / "final_masks"
    from ..engine.data.concepts import tensor_to_pil
    from ..engine.files import atomic_save_image

    for label, m in zip(result.labels, result.mask_batch()):
        i, token = label.split(": ", 1)
        atomic_save_image(masks_dir / f"{i.replace(' ', '')}_{token.strip('<>')}.png", tensor_to_pil(m))
    return {"steps": len(result.losses), "resumed_from": result.resumed_from, "final_loss": result.losses[-1],
            "run_dir": str(result.run_dir), "exports": {k: str(v) for k, v in result.exports.items()},
            "masks": str(masks_dir), "rounds": [{"step": r.step, "iou": r.iou} for r in result.rounds],
            "info": result.info()}


def _read_mask_folder(folder: Path, stems: list[str], *, what: str, input: str) -> list:
    """`folder/<stem>.png` for every stem (a mask per image), or an error naming the first missing one."""
    from PIL import Image

    from ..engine.data.concepts import pil_to_mask

    out = []
    for stem in stems:
        path = next((folder / f"{stem}{ext}" for ext in (".png", ".jpg", ".webp") if (folder / f"{stem}{ext}").is_file()),
                    None)
        if path is None:
            raise UnconfusedError(f"{what}: {folder} has no mask {stem}.png (one per image, same name)",
                                  input=input)
        try:
            with Image.open(path) as im:
                out.append(pil_to_mask(im))
        except Exception as e:  # PIL raises many types for damaged files
            raise UnconfusedError(f"{what}: cannot read the mask {path} ({e}); replace the file",
                                  input=input) from e
    return out


@_job("eval")
def run_eval(config_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Evaluation job: `images` (a folder of generated images, each with a same-name .txt prompt, or
    `prompt` for all), the references (`concepts` FOLDER:TOKEN:CLASS - masks from FOLDER/masks/<name>.png
    if all present - or `concept_set`), `clip` (an open_clip checkpoint: a path or a file in
    models/clip_vision of the workdir), optional `dino` (a transformers DINO folder), `region_masks`
    (a folder with <image name>/<token without <>>.png), `masks_a` + `masks_b` (two folders of
    same-name masks: IoU), `output` (default eval-report) and [settings] convention, text_mode,
    region_threshold. Writes report.json, metrics.csv, per_image.csv and heat maps into `output`."""
    from ..engine.evaluation import metrics as M
    from ..engine.vision.clip_zero_shot import load_clip, load_clip_by_name
    from ..engine.vision.dino import load_dino

    config, base = read_config(config_path, overrides, node="eval")
    settings = dict(config["settings"])
    unknown = sorted(set(settings) - {"convention", "text_mode", "region_threshold"})
    if unknown:
        raise UnconfusedError(f"unknown settings {unknown}; known: convention, text_mode, region_threshold",
                              input="--config")
    from dataclasses import asdict

    from ..trainers.loop import settings_from_dict

    settings = asdict(settings_from_dict(M.EvalSettings, settings))
    workdir = _path(base, config.get("workdir", "."))
    host.configure(models_dir=workdir / "models", output_dir=workdir / "output", temp_dir=workdir / "temp")
    out_dir = _path(base, config.get("output", "eval-report"))
    report = None
    if config.get("images"):
        if not config.get("clip"):
            raise UnconfusedError("the eval job needs 'clip' (an open_clip checkpoint with both towers, e.g. ViT-B/32 "
                                  "as the papers use): a path, or a file name in models/clip_vision",
                                  input="--config")
        folder = _path(base, config["images"])
        images, stems, captions = load_images_from_folder(folder, input="images")
        if captions is None:
            missing = [s for s in stems if not (folder / f"{s}.txt").is_file()]
            if not config.get("prompt"):
                raise UnconfusedError(f"{len(missing)} image(s) in {folder} have no prompt file (e.g. {missing[0]}.txt); "
                                      "write the prompt each image was made from into <image name>.txt, or give "
                                      "'prompt' for all", input="images")
            from ..engine.data.concepts import read_caption

            captions = [read_caption(folder / f"{s}.txt") or config["prompt"] for s in stems]
        cs = concepts_from_config(config, base) if config.get("concepts") or config.get("concept_set") \
            else None
        if cs is None:
            raise UnconfusedError("the eval job needs the references: 'concepts' (FOLDER:TOKEN:CLASS) or "
                                  "'concept_set'", input="--config")
        refs = []
        specs = config.get("concepts") or []
        for k, c in enumerate(cs.concepts):
            masks = c.masks
            if masks is None and k < len(specs):
                spec = specs[k]
                ref_folder = _path(base, parse_concept_spec(spec, input="concepts")[0]
                                   if isinstance(spec, str) else spec["folder"]) / "masks"
                if ref_folder.is_dir():
                    masks = _read_mask_folder(ref_folder, c.names, what=f"references of {c.token}", input="concepts")
            refs.append(M.Reference(c.token, c.class_word, c.images, masks))
        clip_path = _path(base, config["clip"])
        clip = load_clip(clip_path, input="clip") if clip_path.is_file() else \
            load_clip_by_name(config["clip"], input="clip")
        dino = load_dino(_path(base, config["dino"]), input="dino") if config.get("dino") else None
        regions = None
        if config.get("region_masks"):
            rfolder = _path(base, config["region_masks"])
            regions = []
            for stem, img in zip(stems, images):
                row = []
                for r in refs:
                    p = rfolder / stem / f"{r.token.strip('<>')}.png"
                    row.append(_read_mask_folder(p.parent, [p.stem], what="region masks", input="region_masks")[0]
                               if p.is_file() else None)
                regions.append(row)
        report = M.evaluate(images, captions, refs, clip, dino=dino, region_masks=regions,
                            settings=M.EvalSettings(**settings))
        for row in report.per_image:
            row["file"] = stems[row["image"]]
    if config.get("masks_a") or config.get("masks_b"):
        if not (config.get("masks_a") and config.get("masks_b")):
            raise UnconfusedError("mask IoU needs both 'masks_a' and 'masks_b' (folders of same-name masks)",
                                  input="--config")
        fa, fb = _path(base, config["masks_a"]), _path(base, config["masks_b"])
        if not fa.is_dir():
            raise UnconfusedError(f"{fa} is not a folder", input="masks_a")
        stems = sorted(p.stem for p in fa.iterdir() if p.suffix.lower() in (".png", ".jpg", ".webp"))
        if not stems:
            raise UnconfusedError(f"{fa} holds no masks (.png)", input="masks_a")
        ious = M.mask_iou(_read_mask_folder(fa, stems, what="masks_a", input="masks_a"),
                          _read_mask_folder(fb, stems, what="masks_b", input="masks_b"),
                          settings.get("region_threshold", 0.5))
        report = report or M.EvalReport(settings={"convention": "", "text_mode": ""})
        for stem, v in zip(stems, ious):
            report.add("mask_iou", v, concept=stem, n=1)
        report.add("mask_iou", sum(ious) / len(ious), n=len(ious), note="mean over masks")
    if report is None:
        raise UnconfusedError("nothing to evaluate: give 'images' (+ references and clip) and/or 'masks_a' + "
                              "'masks_b'", input="--config")
    files = report.write(out_dir)
    return {"output": str(out_dir), "files": {k: str(v) for k, v in files.items()}, "rows": report.rows,
            "table": report.table()}


# ---------------------------------------------------------------- the demo (the main job)
@_job("demo")
def demo_settings(config_path: str | Path | None, sets: list[str] | None = None, flags: dict | None = None):
    """The demo's FlowSettings from a job file (optional), `--set KEY=VALUE` items and the command's
    flags (which win). The job file: `model`, `clip`, `sam`, `concepts` (FOLDER:TOKEN:CLASS, or "demo"
    for the built-in two), `workdir`, `preset`, and [settings] with the flags' names (pairs,
    bank_images, clif_steps, lora_steps, resolution, ...) and the stages' own settings as
    `[settings.clif]`, `[settings.lora]`, `[settings.augment]`, `[settings.bank]` (or "clif.batch_size")."""
    from .flow import OWN_NUMBERS, OWN_TEXTS, FlowSettings
    from ..trainers.loop import CliText, parse_setting
    from .smoke import ConceptSpec

    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if config_path is not None:
        config, base = read_config(config_path, sets, node="demo")
        table = dict(config["settings"])
        values = {"workdir": _path(base, config.get("workdir", "."))}
        for key, name in (("model", "ckpt"), ("clip", "clip"), ("sam", "sam")):
            if config.get(key):
                values[name] = _path(base, config[key])
        if config.get("prompt"):
            values["prompt"] = config["prompt"]
        specs = config.get("concepts")
        if specs and specs != "demo":
            values["concepts"] = []
            for spec in specs:
                if isinstance(spec, str):
                    folder, token, class_word = parse_concept_spec(spec, input="concepts")
                else:
                    folder, token, class_word = spec["folder"], spec["token"], spec["class_word"]
                values["concepts"].append(ConceptSpec(_path(base, str(folder)), token, class_word))
        if config.get("concept_set"):
            raise UnconfusedError("the demo reads photos: give 'concepts' (FOLDER:TOKEN:CLASS), not 'concept_set'",
                                  input="concept_set")
    else:
        values, table = {}, {}
        for item in sets or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise UnconfusedError(f"'{item}' is not key=value, e.g. --set clif.batch_size=32",
                                      input="--set")
            table[key.strip()] = CliText(value)
    overrides = {}
    for key, value in table.items():
        if key in OWN_NUMBERS or key in OWN_TEXTS:
            values[key] = parse_setting(key, value, int if key in OWN_NUMBERS else str)
        elif isinstance(value, dict):  # [settings.clif] batch_size = 32 -> "clif.batch_size"
            overrides.update({f"{key}.{k}": v for k, v in value.items()})
        else:  # a stage's own setting (flow.make_plan names a wrong stage; the stage names a wrong key)
            overrides[key] = value
    values.update(flags)
    if overrides:
        values["overrides"] = overrides
    return FlowSettings(**values)


# ------------------------------------------------------------------ memory plan of a job file
def job_kind(config: dict) -> str:
    """Which trainer a job file is for: CLIF (dataset + image_tower), mask EM (images + concept
    lines), else LoRA."""
    if config.get("dataset") and config.get("image_tower"):
        return "clif"
    if config.get("images") and not config.get("clip"):
        return "em"
    return "lora"


def plan_job(config_path, overrides: list[str] | None = None, *, trainer: str | None = None,
             family: str | None = None, sizes=None):
    """The plan of a `lora` / `clif` / `em` job file (the same files those commands run); the
    model file is only read for its family."""
    from ..trainers.memory_plan import GPU_SIZES, TRAINERS, advise, family_of

    config, base = read_config(config_path, overrides, node="plan")
    trainer = trainer or job_kind(config)
    if trainer == "clif":
        from ..trainers.clif import NODE, ClifSettings as cls
    elif trainer == "em":
        from ..trainers.em import NODE, EMSettings as cls
    elif trainer == "lora":
        from ..trainers.lora import NODE, LoraSettings as cls
    else:
        raise UnconfusedError(f"unknown trainer {trainer!r}; use one of {TRAINERS}", node="plan", input="--trainer")
    with host.running_node(name=NODE):  # the settings name their trainer's node, as on the node
        settings = cls.from_dict(config["settings"]).validated()
    if family is None:
        family = family_of(_path(base, config["model"]) if config.get("model") else None)
    return advise(trainer, family, settings, sizes or GPU_SIZES)
