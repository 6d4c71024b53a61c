"""Settings declared once (engine/settings.py): one declaration per setting gives the node's input,
the run's checks and the docs table."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from unconfused.engine import host
from unconfused.engine.errors import UnconfusedError
from unconfused.engine.settings import check_declared, declaration, node_input, reference_rows, setting
from unconfused.nodes.clif import UnconfusedTrainCLIF
from unconfused.nodes.em import UnconfusedTrainMaskEM
from unconfused.nodes.lora import UnconfusedTrainLoRA
from unconfused.trainers.clif import ClifSettings
from unconfused.trainers.em import EMSettings
from unconfused.trainers.lora import LoraSettings

REPO = Path(__file__).resolve().parents[1]
NODES = [(UnconfusedTrainLoRA, LoraSettings), (UnconfusedTrainCLIF, ClifSettings), (UnconfusedTrainMaskEM, EMSettings)]


@dataclass
class Toy:
    steps: int = setting(10, min=1, ui_max=500, tip="how many")
    rate: float = setting(0.5, min=0.0, max=1.0, step=0.05, tip="a share")
    mode: str = setting("a", choices=["a", "b"], tip="which")
    prompts: list[str] = setting(["x", "y"], lines=True, tip="one per line")


def test_one_declaration_gives_the_input_the_check_and_the_docs_row():
    assert node_input(Toy, "steps") == ("INT", {"default": 10, "min": 1, "max": 500, "step": 1, "tooltip": "how many"})
    assert node_input(Toy, "rate") == ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "round": False,
                                                 "tooltip": "a share"})
    assert node_input(Toy, "mode") == (["a", "b"], {"default": "a", "tooltip": "which"})
    assert node_input(Toy, "prompts")[1]["default"] == "x\ny" and node_input(Toy, "prompts")[1]["multiline"]
    assert Toy().prompts == ["x", "y"] and Toy().prompts is not Toy().prompts  # a fresh list per instance
    check_declared(Toy(steps=100000))  # ui_max is the widget's end only, not a bound
    for bad, input in ((dict(steps=0), "steps"), (dict(rate=1.5), "rate"), (dict(mode="c"), "mode")):
        with pytest.raises(UnconfusedError) as e, host.running_node(name="Node"):
            check_declared(Toy(**bad))
        assert e.value.input == input and "Node" in str(e.value)
    rows = {r["name"]: r for r in reference_rows(Toy)}
    assert rows["rate"]["max"] == 1.0 and rows["mode"]["choices"] == ["a", "b"] and rows["steps"]["tip"] == "how many"


@pytest.mark.parametrize("node,cls", NODES, ids=lambda x: getattr(x, "__name__", ""))
def test_trainer_nodes_take_their_inputs_from_the_declarations(node, cls):
    spec = node.INPUT_TYPES()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    shown = [(n, v) for sect in ("required", "optional") for n, v in spec[sect].items() if n in fields]
    assert len(shown) >= 15
    for name, value in shown:
        assert value == node_input(cls, name), name
        assert value[1]["default"] == (getattr(cls(), name) if name != "validation_prompts" else ""), name
        assert value[1].get("tooltip"), f"{node.__name__}.{name} has no tooltip: declare tip= on the setting"
    # the EM node shows an inherited setting with its own meaning: declared again on EMSettings
    assert declaration(EMSettings, "resolution")["tip"] != declaration(LoraSettings, "resolution")["tip"]
    assert declaration(EMSettings, "steps")["tip"] != declaration(LoraSettings, "steps")["tip"]


@pytest.mark.parametrize("cls,bad,input", [
    (LoraSettings, dict(rank=0), "rank"), (LoraSettings, dict(optimizer="sgd"), "optimizer"),
    (LoraSettings, dict(mask_normalize="pixels"), "mask_normalize"), (ClifSettings, dict(train="all"), "train"),
    (ClifSettings, dict(vectors_per_token=0), "vectors_per_token"), (EMSettings, dict(crf_at="gpu"), "crf_at"),
    (EMSettings, dict(threshold_mode="mean"), "threshold_mode"), (EMSettings, dict(init_timesteps=0), "init_timesteps"),
    (LoraSettings, dict(seed=-1), "seed"), (LoraSettings, dict(preset="fast"), "preset")])
def test_declared_bounds_and_choices_are_checked_on_every_run(cls, bad, input):
    with pytest.raises(UnconfusedError) as e:
        cls(**bad).validated()
    assert e.value.input == input


def test_a_job_file_may_go_past_a_widget_end():
    assert LoraSettings(steps=250000).validated().steps == 250000


def test_settings_page_is_generated_from_the_declarations():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "settings", "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (REPO / "docs" / "settings.md").read_text("utf-8")
    for cls in (LoraSettings, ClifSettings, EMSettings):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f.name
