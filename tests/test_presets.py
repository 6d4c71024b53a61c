"""Presets (issue 17 item 1): `paper` gives exactly the documented values with a source for each, the user's
explicit values win, unknown presets are refused with the choices, docs/presets.md is generated, and the
settings record where every value came from."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from unconfused.engine import host
from unconfused.engine import presets as P
from unconfused.engine.errors import UnconfusedError
from unconfused.engine.models.exports import clean_metadata
from unconfused.trainers.clif import ClifSettings
from unconfused.trainers.em import EMSettings
from unconfused.trainers.lora import LoraSettings

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"lora": LoraSettings, "clif": ClifSettings, "em": EMSettings}


def _doc_tables() -> dict[tuple[str, str], dict[str, str]]:
    """(kind, preset) -> setting -> the value cell of docs/presets.md, as a reader sees the page."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    kind = section = None
    header: list[str] = []
    for line in (REPO / "docs" / "presets.md").read_text("utf-8").splitlines():
        if m := re.match(r"## `(\w+)` trainer", line):
            kind = m.group(1)
        elif m := re.match(r"### `([\w-]+)`", line):
            section = m.group(1)
        elif line.startswith("| setting |"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| `") and kind and section:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            name = cells[0].strip("`")
            for col, cell in zip(header[1:], cells[1:]):
                if col in P.PRESETS[kind] and cell != "-":
                    out.setdefault((kind, col), {})[name] = cell
    return out


def test_doc_page_is_generated_from_the_tables():
    """docs/presets.md is exactly what `scripts/gen_docs.py presets` makes (run it after a change)."""
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (REPO / "docs" / "presets.md").read_text("utf-8") == gen.presets_page(), \
        "run: python scripts/gen_docs.py presets"


@pytest.mark.parametrize("kind", list(CLASSES))
def test_every_preset_yields_exactly_the_documented_values(kind):
    """Through apply_preset, each preset sets exactly the values of its docs table; every other setting
    keeps its default; the settings remember the preset."""
    cls, tables = CLASSES[kind], _doc_tables()
    base = P.defaults(cls)
    for name, table in P.PRESETS[kind].items():
        s = P.apply_preset(cls, name, {})
        doc = tables[(kind, name)]
        assert set(doc) == set(table), (kind, name)
        for key in doc:
            assert P._fmt(getattr(s, key)) == doc[key], (kind, name, key)
        for key in set(base) - set(table) - {"preset"}:
            assert getattr(s, key) == base[key], (kind, name, key)
        assert s.preset == name
    custom = P.apply_preset(cls, "custom", {})
    assert {k: getattr(custom, k) for k in base} == base


def test_paper_is_the_papers_recipe():
    """Spot checks against the papers, so a table edit that drifts from them fails here too."""
    clif = P.apply_preset(ClifSettings, "paper", {})
    assert (clif.batch_size, clif.learning_rate, clif.kinds) == (128, 1e-4, "global,region")  # CLIF app. + code
    stage2 = P.apply_preset(LoraSettings, "paper", {})
    assert (stage2.rank, stage2.unet_lr, stage2.token_lr, stage2.masked_loss, stage2.text_encoder_lora) == \
        (8, 2e-4, 2e-4, False, False)  # CLIF app.: r = 8, Adam 2e-4, text encoder frozen
    assert "{class_word}" not in stage2.template  # stage 2 captions like stage 1's
    sid = P.apply_preset(LoraSettings, "paper-sid", {})
    assert (sid.steps, sid.batch_size, sid.prior_preservation, sid.text_encoder_lora) == (1000, 1, True, True)
    em = P.apply_preset(EMSettings, "paper", {})
    assert (em.steps, em.tokens_only_steps, em.token_lr, em.attention_weight, em.init_timesteps,
            em.threshold_mode) == (800, 400, 5e-4, 1e-2, 50, "fixed")


def test_every_value_has_a_source_and_deviations_are_explained():
    for kind, cls in CLASSES.items():
        P.check_table(cls)
        for name, table in P.PRESETS[kind].items():
            for key, v in table.items():
                assert len(v.source) > 10, (kind, name, key)
                if name.startswith("paper") and v.source.startswith("ours"):
                    # a value the paper does not give, or gives differently: the why is in the source or deviation
                    assert ":" in v.source, (kind, name, key)
        assert (kind, "quick") in P.ABOUT and all((kind, n) in P.ABOUT for n in P.PRESETS[kind])


def test_a_value_for_a_setting_that_does_not_exist_is_an_error(monkeypatch):
    """A preset naming a setting the class lacks (a renamed field), or a value of the wrong type, is the
    pack's mistake: refused at once, naming the preset and the setting."""
    bad = dict(P.PRESETS["lora"], paper={**P.PRESETS["lora"]["paper"], "unet_rate": P.V(1e-4, "ours: typo")})
    monkeypatch.setitem(P.PRESETS, "lora", bad)
    with pytest.raises(ValueError, match="'paper' of the lora trainer sets 'unet_rate'"):
        P.apply_preset(LoraSettings, "paper", {})
    wrong = dict(P.PRESETS["lora"], paper={"steps": P.V("800", "ours: text")})
    monkeypatch.setitem(P.PRESETS, "lora", wrong)
    with pytest.raises(ValueError, match="'steps' the str"):
        P.apply_preset(LoraSettings, "paper", {})


def test_user_overrides_win_and_the_origin_of_every_setting_is_known():
    s = P.apply_preset(EMSettings, "paper", {"unet_lr": 3e-4, "seed": 7, "tokens_only_steps": 300})
    assert (s.unet_lr, s.seed, s.tokens_only_steps) == (3e-4, 7, 300)
    assert s.steps == 800 and s.threshold_mode == "fixed"  # the rest of the preset stays
    eff = P.effective(s)
    assert eff["unet_lr"] == {"value": 3e-4, "from": "user"} and eff["seed"]["from"] == "user"
    assert eff["steps"] == {"value": 800, "from": "preset"} and eff["rank"] == {"value": 8, "from": "default"}
    assert "preset" not in eff and set(eff) == {f.name for f in fields(EMSettings)} - {"preset"}
    # a dict with `preset` (job files, the Python API) gets the same, and expanding twice changes nothing
    data = P.with_preset(EMSettings, {"preset": "paper", "unet_lr": 3e-4})
    assert P.with_preset(EMSettings, data) == data and EMSettings.from_dict(data).unet_lr == 3e-4


def test_unknown_preset_is_refused_with_the_choices(tmp_path):
    with pytest.raises(UnconfusedError) as e:
        with host.running_node(name="UnconfusedTrainLoRA"):
            P.apply_preset(LoraSettings, "papers", {})
    msg = str(e.value)
    assert e.value.input == "preset" and "UnconfusedTrainLoRA" in msg
    assert "'papers' is not a preset of the lora trainer" in msg and "custom, paper, paper-sid, quick" in msg
    with pytest.raises(UnconfusedError, match="choose one of custom, paper, quick"):
        ClifSettings.from_dict({"preset": "fast"})
    with pytest.raises(UnconfusedError, match="must be text"):
        EMSettings.from_dict({"preset": 3})
    from unconfused.app.jobs import read_config

    job = tmp_path / "job.toml"
    job.write_text('preset = "qiuck"\n[settings]\nsteps = 3\n')
    config, _ = read_config(job, node="lora")
    with pytest.raises(UnconfusedError, match="'qiuck' is not a preset of the lora trainer"):
        LoraSettings.from_dict(config["settings"])


def test_job_file_preset_at_the_top_in_settings_and_by_set(tmp_path):
    """`preset = "paper"` in a job file yields the paper values; [settings] and --set values win."""
    from unconfused.app.jobs import read_config

    job = tmp_path / "job.toml"
    job.write_text('preset = "paper"\n[settings]\nsteps = 5\nname = "p"\n')
    config, _ = read_config(job, ["unet_lr=3e-4"], node="em")
    s = EMSettings.from_dict(config["settings"])
    want = {k: v.value for k, v in P.PRESETS["em"]["paper"].items()}
    assert s.preset == "paper" and (s.steps, s.unet_lr, s.name) == (5, 3e-4, "p")
    assert all(getattr(s, k) == v for k, v in want.items() if k not in ("steps", "unet_lr", "tokens_only_steps"))
    job.write_text('[settings]\npreset = "quick"\n')
    config, _ = read_config(job, ["preset=\"paper\""], node="clif")
    assert ClifSettings.from_dict(config["settings"]) == P.apply_preset(ClifSettings, "paper", {})


def test_lora_job_with_the_paper_preset_trains_with_its_values(tmp_path, dreambooth_dir, capsys):
    """The whole CLI path: a job file with `preset = "paper"` trains with the table's values (the run
    folder's run.json holds what was trained) and the user's steps."""
    from unconfused.app.cli import main

    job = tmp_path / "job.toml"
    job.write_text(f'preset = "paper"\nconcepts = ["{dreambooth_dir / "cat"}:<my-cat>:cat"]\n'
                   '[settings]\nname = "pp"\nsteps = 2\nresolution = 64\nexport = false\n')
    assert main(["lora", "--config", str(job)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    trained = json.loads((Path(report["run_dir"]) / "run.json").read_text())["config"]["settings"]
    for key, v in P.PRESETS["lora"]["paper"].items():
        assert trained[key] == v.value, key
    assert trained["steps"] == 2 and "preset" not in trained


def test_preset_name_is_not_part_of_the_resume_identity():
    """The values a preset sets are hashed (a different preset with other values is another run); the
    name alone is not (custom with the same values resumes the paper run)."""
    paper = P.apply_preset(LoraSettings, "paper", {})
    same = LoraSettings(**{**{f.name: getattr(paper, f.name) for f in fields(LoraSettings)}, "preset": "custom"})
    assert paper.hashed() == same.hashed()
    assert paper.hashed() != P.apply_preset(LoraSettings, "quick", {}).hashed()
    assert "preset" not in P.apply_preset(ClifSettings, "paper", {}).hashed()


def test_record_and_export_metadata(tmp_path):
    """The run folder's settings.json and the export header hold the preset and every effective setting."""
    s = P.apply_preset(ClifSettings, "quick", {"seed": 3})
    path = P.write_record(tmp_path, s)
    rec = json.loads(path.read_text())
    assert path.name == "settings.json" and rec["preset"] == "quick" and rec["trainer"] == "clif"
    assert rec["settings"]["train"] == "tokens" and rec["from"]["train"] == "preset"
    assert rec["from"]["seed"] == "user" and rec["from"]["rank"] == "default"
    assert set(rec["settings"]) == {f.name for f in fields(ClifSettings)} - {"preset"}
    header = clean_metadata(P.export_metadata(s))  # no key that could carry a path or secret
    assert header["unconfused_preset"] == "quick" and json.loads(header["unconfused_user_settings"]) == ["seed"]
    assert json.loads(header["unconfused_settings"])["steps"] == 3000


# ---------------------------------------------------------------- nodes
def _widgets(node_cls) -> dict:
    """What ComfyUI sends: every widget's value (here: its default), no sockets, no preset."""
    spec = node_cls.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, decl in spec.get(group, {}).items():
            if isinstance(decl[0], list) or decl[0] in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                if len(decl) > 1 and "default" in decl[1]:
                    out[name] = decl[1]["default"]
    return out


class _Caught(Exception):
    pass


def _catch(*args, **kwargs):
    raise _Caught(args, kwargs)


def _settings_of(exc: _Caught):
    return next(a for a in list(exc.args[0]) + list(exc.args[1].values())
                if type(a).__name__.endswith("Settings"))


def test_nodes_apply_the_preset_under_changed_widgets(monkeypatch):
    """Every trainer node has `preset` (after the inputs it had before it, so saved workflows keep their widget order); a
    widget still at its default takes the preset's value, a widget the user changed wins."""
    import torch

    from unconfused.nodes import clif as NC, em as NE, lora as NT
    from unconfused.trainers import clif as TC, em as TE, lora as TL

    for node, kind in ((NT.UnconfusedTrainLoRA, "lora"), (NC.UnconfusedTrainCLIF, "clif"),
                       (NE.UnconfusedTrainMaskEM, "em")):
        optional = list(node.INPUT_TYPES()["optional"])
        # inputs added after the presets (aspect) follow it: a saved workflow's widget values stay in order
        assert optional[optional.index("preset") + 1:] in ([], ["aspect"])
        assert node.INPUT_TYPES()["optional"]["preset"][0] == P.choices(kind)
        assert node.INPUT_TYPES()["optional"]["preset"][1]["default"] == "custom"

    monkeypatch.setattr(TL, "train_lora", _catch)
    kw = {k: v for k, v in _widgets(NT.UnconfusedTrainLoRA).items() if k not in ("validation_prompts",)}
    cs = type("CS", (), {"concepts": []})()
    with pytest.raises(_Caught) as e:
        NT.UnconfusedTrainLoRA()._train(None, cs, None, "", **dict(kw, preset="paper", rank=16))
    s = _settings_of(e.value)
    assert s.preset == "paper" and s.rank == 16 and s.unet_lr == 2e-4 and s.masked_loss is False
    with pytest.raises(_Caught) as e:  # no preset input (an API workflow from before): custom, widgets as given
        NT.UnconfusedTrainLoRA()._train(None, cs, None, "", **kw)
    assert _settings_of(e.value) == LoraSettings()

    monkeypatch.setattr(TC, "train_clif", _catch)
    monkeypatch.setattr(TC, "resolve_tower", lambda *a, **k: None)
    model = type("M", (), {"text_encoder": None})()
    kw = {k: v for k, v in _widgets(NC.UnconfusedTrainCLIF).items() if k != "image_tower"}
    with pytest.raises(_Caught) as e:
        NC.UnconfusedTrainCLIF().train(model, None, **dict(kw, preset="quick", batch_size=16))
    s = _settings_of(e.value)
    assert (s.preset, s.train, s.steps, s.batch_size) == ("quick", "tokens", 3000, 16)

    monkeypatch.setattr(TE, "train_em", _catch)
    monkeypatch.setattr(TE, "make_scenes", lambda *a, **k: [])
    kw = {k: v for k, v in _widgets(NE.UnconfusedTrainMaskEM).items() if k not in ("concepts", "validation_prompts")}
    with pytest.raises(_Caught) as e:
        NE.UnconfusedTrainMaskEM()._train(None, torch.zeros(1, 8, 8, 3), "<a> cat", None, "",
                                          **dict(kw, preset="paper", crf_at="off"))
    s = _settings_of(e.value)
    assert (s.steps, s.threshold_mode, s.crf_at, s.attention_weight) == (800, "fixed", "off", 1e-2)


def test_run_folder_and_exports_record_the_preset(tmp_path, dreambooth_dir, capsys):
    """A real run records its preset and every effective setting: settings.json in the run folder, the
    safetensors header of each export."""
    from safetensors import safe_open

    from unconfused.app.cli import main

    job = tmp_path / "job.toml"
    job.write_text(f'preset = "quick"\nconcepts = ["{dreambooth_dir / "cat"}:<my-cat>:cat"]\n'
                   '[settings]\nname = "rec"\nsteps = 2\nresolution = 64\n')
    assert main(["lora", "--config", str(job)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    rec = json.loads((Path(report["run_dir"]) / "settings.json").read_text())
    assert rec["preset"] == "quick" and rec["from"]["steps"] == "user" and rec["from"]["min_snr_gamma"] == "preset"
    for path in report["exports"].values():
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["unconfused_preset"] == "quick"
        assert json.loads(meta["unconfused_settings"])["min_snr_gamma"] == 5.0
