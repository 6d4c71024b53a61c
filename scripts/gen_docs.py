"""Generate the reference pages of docs/ from the code, so they cannot drift from it.

    python scripts/gen_docs.py nodes [--check]                    # docs/nodes.md from the nodes' declarations
    python scripts/gen_docs.py benchmarks RESULTS [--check]       # docs/benchmarks.md from benchmarks/run_all's JSON
    python scripts/gen_docs.py picture                            # docs/img/mix_pairs.jpg, the README's picture
    python scripts/gen_docs.py presets [--check]                  # docs/presets.md from engine/presets.py
    python scripts/gen_docs.py settings [--check]                 # docs/settings.md from the settings declarations

`nodes` reads every node class the pack registers (INPUT_TYPES, RETURN_TYPES/RETURN_NAMES, DESCRIPTION or
the class docstring, tooltips, OUTPUT_NODE). File lists (checkpoints, SAM files, ...) depend on the
machine: they are read against empty model folders, so the page says what an empty install offers.
`benchmarks` renders the `rows` of the summary `benchmarks/run_all.py --out` writes.
`picture` runs the pack on the test photos: DenseCRF snaps a centred ellipse to each subject (the cut-out),
then CLIF's Mix augmentation pastes two concepts side by side with their captions (masks tinted).
`--check` writes nothing and exits 1 when the page differs from what the code gives (tests/test_layers.py
and CI run the nodes check).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES_MD = REPO / "docs" / "nodes.md"
BENCH_MD = REPO / "docs" / "benchmarks.md"
PRESETS_MD = REPO / "docs" / "presets.md"
SETTINGS_MD = REPO / "docs" / "settings.md"
METRICS_MD = REPO / "docs" / "metrics.md"
LONG = 24  # a choice list longer than this comes from a library, not from the pack: not listed


def _import_pack():
    """This checkout's package (the repository folder is the package `unconfused`), whatever else is
    installed: the pages describe the code beside the script."""
    if "unconfused" not in sys.modules:
        link = Path(tempfile.mkdtemp(prefix="unconfused-docs-")) / "unconfused"
        link.symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(link.parent))
    import unconfused

    if Path(unconfused.__file__).resolve().parent != REPO:
        raise SystemExit(f"the imported unconfused is {unconfused.__file__}, not this checkout {REPO}")
    from unconfused.engine import host
    from unconfused.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return host, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(value, limit: int = 48) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        one = value.replace("\n", " ⏎ ")
        one = one if len(one) <= limit else one[: limit - 3].rstrip() + "..."
        return f"`{one}`" if one else '`""`'
    return f"`{value}`"


def _describe(spec) -> tuple[str, str, str, str]:
    """(type, default, range or choices, tooltip) of one input declaration."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    tip = opts.get("tooltip", "")
    if isinstance(kind, (list, tuple)) and len(kind) <= 1 and all(str(c).startswith("(") for c in kind):
        # a list of the user's files, empty here: the pack shows one "(none ...)" entry then
        return "file choice", "", "the files of your model folders" + (f" (none: `{kind[0]}`)" if kind else ""), tip
    if isinstance(kind, (list, tuple)) and len(kind) > LONG:
        # e.g. open_clip's architectures: what the installed library (and the running process) registers
        return "choice", _default(opts.get("default", kind[0])), "a long list the installed libraries give", tip
    if isinstance(kind, (list, tuple)):
        choices = ", ".join(f"`{c}`" for c in kind)
        return "choice", _default(opts.get("default", kind[0] if kind else None)), choices, tip
    span = ""
    if kind in ("INT", "FLOAT"):
        lo, hi, step = opts.get("min"), opts.get("max"), opts.get("step")
        span = f"{lo} .. {hi}" if lo is not None or hi is not None else ""
        if step not in (None, 1):
            span += f" (step {step})"
    if kind == "STRING" and opts.get("multiline"):
        kind = "STRING, multi-line"
    return kind, _default(opts.get("default")), span, tip


def _description(cls) -> str:
    text = getattr(cls, "DESCRIPTION", None) or (cls.__doc__ or "")
    return " ".join(text.strip().split("\n\n")[0].split())


def nodes_page() -> str:
    host, classes, names = _import_pack()
    with tempfile.TemporaryDirectory() as empty:
        os.environ.pop("UNCONFUSED_MODELS_DIR", None)
        host.reset_standalone()
        host.configure(models_dir=Path(empty) / "models", output_dir=Path(empty) / "output",
                       temp_dir=Path(empty) / "temp")
        try:
            specs = {nid: cls.INPUT_TYPES() for nid, cls in classes.items()}
        finally:
            host.reset_standalone()
    by_cat: dict[str, list[str]] = {}
    for nid, cls in classes.items():
        by_cat.setdefault(cls.CATEGORY, []).append(nid)
    out = ["# Node reference", "",
           "<!-- Generated by scripts/gen_docs.py from the nodes' declarations; do not edit by hand: run",
           "     `python scripts/gen_docs.py nodes` after changing a node (tests/test_layers.py checks it). -->", "",
           f"{len(classes)} nodes, under **Unconfused/** in ComfyUI's node menu. What each stage does, its run",
           "folders, exports and measured speed: [guide.md](guide.md). Lists of model files show what an empty",
           "install offers; ComfyUI fills them from your model folders ([README](../README.md#where-model-files-go)).",
           ""]
    for cat in by_cat:  # the menu's order: the pack registers its stages in pipeline order
        out.append(f"- [{cat}](#{cat.lower().replace('/', '')})")
    for cat in by_cat:
        out += ["", f"## {cat}"]
        for nid in by_cat[cat]:
            cls = classes[nid]
            out += ["", f"### {names.get(nid, nid)}", "",
                    f"`{nid}`" + (" · output node (runs with nothing connected)" if getattr(cls, "OUTPUT_NODE", False)
                                  else "")]
            desc = _description(cls)
            if desc:
                out += ["", desc]
            rows = []
            for group in ("required", "optional"):
                for name, spec in specs[nid].get(group, {}).items():
                    kind, default, span, tip = _describe(spec)
                    label = f"`{name}`" + ("" if group == "required" else " (optional)")
                    rows.append(f"| {label} | {_cell(kind)} | {_cell(default)} | {_cell(span)} | {_cell(tip)} |")
            if rows:
                out += ["", "| input | type | default | range / choices | what it does |", "|---|---|---|---|---|", *rows]
            ret_names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
            if cls.RETURN_TYPES and tips:
                out += ["", "| output | type | what it is |", "|---|---|---|"]
                out += [f"| `{n}` | {_cell(t)} | {_cell(tip)} |" for n, t, tip in zip(ret_names, cls.RETURN_TYPES, tips)]
            elif cls.RETURN_TYPES:
                out += ["", "Outputs: " + ", ".join(f"`{n}` ({t})" for n, t in zip(ret_names, cls.RETURN_TYPES)) + "."]
    return "\n".join(out) + "\n"


BENCH_INTRO = """# Benchmarks

<!-- Generated by scripts/gen_docs.py from a benchmarks/run_all.py summary; do not edit by hand. -->

`benchmarks/run_all` reruns every benchmark, each in its own process, one after another, and writes
the summary to `benchmarks/results.json` (`--quick` for a smoke run, `--only NAME` for one); then
`python scripts/gen_docs.py benchmarks benchmarks/results.json` writes this page. Speed targets are
ratios against a reference measured in the same process, interleaved, so a busy machine shifts both
sides. What each benchmark measures and how: the docstring at the top of `benchmarks/<name>.py`;
the stage-by-stage numbers behind them: [guide.md](guide.md).
"""


def benchmarks_page(results: dict) -> str:
    cols = [c for c in results.get("columns", []) if c != "README"]
    keep = [i for i, c in enumerate(results.get("columns", [])) if c != "README"]
    started = results.get("started", "")
    try:
        when = started if len(started) == 10 else _dt.datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        when = started or "unknown date"
    machine = results.get("machine", {})
    run = (f"Run of {when}: {machine.get('cpus', '?')} CPUs ({machine.get('platform', '?')}), "
           f"{results.get('wall_s', '?')} s in all" + (" - a `--quick` smoke run, not comparable numbers" if
                                                        results.get("quick") else "") + ".")
    note = results.get("note")
    lines = [BENCH_INTRO, run + (f" {note}" if note else ""), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in results.get("rows", []):
        lines.append("| " + " | ".join(_cell(row[i]) for i in keep) + " |")
    statuses = results.get("benchmarks", {})
    failed = [n for n, st in statuses.items() if st.get("status") != "ok"]
    if failed:
        lines += ["", f"Failed in this run: {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


def picture(path: Path = REPO / "docs" / "img" / "mix_pairs.jpg") -> Path:
    _import_pack()
    import torch

    from unconfused.engine.data.augment.build import AugmentSettings, build_dataset
    from unconfused.engine.data.augment.preview import preview
    from unconfused.engine.vision import crf
    from unconfused.engine.data.concepts import Concept, concept_from_folder, make_concept_set
    from unconfused.engine.data.augmented_dataset import Dataset

    photos = REPO / "tests" / "data" / "dreambooth"
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    prior = ((yy / 0.8) ** 2 + (xx / 0.7) ** 2 <= 1).float()[None]  # the photos are 256x256, subject centred
    concepts = []
    for sub, token, cls in (("dog2", "<my-dog>", "dog"), ("cat", "<my-cat>", "cat"), ("duck_toy", "<my-duck>", "toy")):
        c = concept_from_folder(photos / sub, token, cls)
        concepts.append(Concept(c.token, c.class_word, c.images, masks=[crf.refine(im, prior)[0] for im in c.images],
                                names=c.names))
    with tempfile.TemporaryDirectory() as work:
        settings = AugmentSettings(seed=0, canvas=256, global_pairs=0, region_pairs=0, mix_per_pair=2)
        build_dataset(make_concept_set(concepts), Path(work) / "ds", settings)
        img = preview(Dataset(Path(work) / "ds"), count=4, seed=0, cell=256, columns=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path, quality=85)
    print(f"wrote {path.relative_to(REPO)}")
    return path


def presets_page() -> str:
    """docs/presets.md: every preset value of every trainer with its source (engine/presets.py)."""
    _import_pack()
    from unconfused.engine import presets
    from unconfused.trainers.clif import ClifSettings
    from unconfused.trainers.em import EMSettings
    from unconfused.trainers.lora import LoraSettings

    return presets.doc_page({"lora": LoraSettings, "clif": ClifSettings, "em": EMSettings})


def _write_or_check(path: Path, text: str, check: bool) -> int:
    if check:
        same = path.is_file() and path.read_text("utf-8") == text
        if not same:
            print(f"{path.relative_to(REPO)} differs from the code; run: python scripts/gen_docs.py "
                  f"{ {NODES_MD: 'nodes', PRESETS_MD: 'presets', SETTINGS_MD: 'settings', METRICS_MD: 'metrics'}.get(path, 'benchmarks RESULTS')}", file=sys.stderr)
        return 0 if same else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, "utf-8")
    tmp.replace(path)
    print(f"wrote {path.relative_to(REPO)}")
    return 0


def settings_page() -> str:
    """Every setting of every trainer, as job files and `--set` take them, from the one declaration
    (engine/settings.py): type, default, bounds or choices, and what it does."""
    _import_pack()
    from unconfused.engine.settings import reference_rows
    from unconfused.trainers import clif, em, lora

    out = ["# Trainer settings", "",
           "Generated by `python scripts/gen_docs.py settings` from the settings dataclasses (engine/settings.py):",
           "each setting is declared once, with its default, bounds, choices and tooltip; the nodes' inputs,",
           "the checks every run makes and the command line's typed `--set` come from the same declaration.",
           "Job files (`[settings]`) and `--set key=value` take every setting below; a node shows the ones",
           "listed in [nodes.md](nodes.md). Bounds are enforced; a widget's upper end that is only a UI",
           "limit is not listed.", ""]
    for title, cls in (("Train LoRA + Tokens (`lora`)", lora.LoraSettings), ("Train CLIF (`clif`)", clif.ClifSettings),
                       ("Train Mask EM (`em`)", em.EMSettings)):
        out += [f"## {title}", "", "| setting | type | default | bounds / choices | what it does |", "|---|---|---|---|---|"]
        for r in reference_rows(cls):
            span = (", ".join(f"`{c}`" for c in r["choices"]) if r["choices"] else
                    " - ".join(str(x) for x in (r["min"], r["max"]) if x is not None) if r["min"] is not None or
                    r["max"] is not None else "")
            if r["min"] is not None and r["max"] is None and not r["choices"]:
                span = f">= {r['min']}"
            tip = r["tip"].replace("|", "\\|").replace("\n", " ")
            default = json.dumps(r["default"]) if not isinstance(r["default"], str) else f"`{r['default']}`"
            out.append(f"| `{r['name']}` | {r['type']} | {default} | {span} | {tip} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="page", required=True)
    n = sub.add_parser("nodes", help="docs/nodes.md from the node declarations")
    n.add_argument("--check", action="store_true")
    b = sub.add_parser("benchmarks", help="docs/benchmarks.md from a run_all summary")
    b.add_argument("results", help="the JSON benchmarks/run_all.py --out wrote (default benchmarks/results.json)")
    b.add_argument("--check", action="store_true")
    sub.add_parser("picture", help="docs/img/mix_pairs.jpg from the test photos")
    pr = sub.add_parser("presets", help="docs/presets.md from engine/presets.py")
    pr.add_argument("--check", action="store_true")
    st = sub.add_parser("settings", help="docs/settings.md from the trainers' settings declarations")
    st.add_argument("--check", action="store_true")
    me = sub.add_parser("metrics", help="docs/metrics.md from the metric declarations (engine/evaluation/metrics.py)")
    me.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.page == "picture":
        picture()
        return 0
    if args.page == "nodes":
        return _write_or_check(NODES_MD, nodes_page(), args.check)
    if args.page == "presets":
        return _write_or_check(PRESETS_MD, presets_page(), args.check)
    if args.page == "settings":
        return _write_or_check(SETTINGS_MD, settings_page(), args.check)
    if args.page == "metrics":
        _import_pack()
        from unconfused.engine.evaluation.metrics import metrics_page
        return _write_or_check(METRICS_MD, metrics_page(), args.check)
    return _write_or_check(BENCH_MD, benchmarks_page(json.loads(Path(args.results).read_text("utf-8"))), args.check)


if __name__ == "__main__":
    sys.exit(main())
