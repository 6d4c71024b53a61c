"""The command line and the README's main job (the smoke run on built-in defaults)."""

import json
import subprocess
import sys

from unconfused.engine.concepts import load_concept_set
from unconfused.trainers.cli import main


def test_smoke_job_on_builtin_defaults(tmp_path, capsys):
    assert main(["smoke", "--workdir", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["family"] == "sd1" and report["batch"] == 6
    assert report["latent_shape"] == [6, 4, 8, 8]
    assert 0 < report["loss_before"] < 10 and report["loss_after"] != report["loss_before"]
    cs = load_concept_set(report["concept_set_folder"])
    assert cs.tokens == ["<red-thing>", "<blue-thing>"]
    assert "report written" in capsys.readouterr().out


def test_smoke_job_with_real_photos_and_a_bad_token(tmp_path, dreambooth_dir, capsys):
    ok = main(["smoke", "--workdir", str(tmp_path / "run"), "--concept", f"{dreambooth_dir / 'dog2'}:<my-dog>:dog",
               "--concept", f"{dreambooth_dir / 'cat'}:<my-cat>:cat"])
    assert ok == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["concepts"]["<my-dog>"]["images"] == len(list((dreambooth_dir / "dog2").glob("*.jpg")))
    assert main(["smoke", "--workdir", str(tmp_path / "run2"), "--concept", f"{dreambooth_dir / 'cat'}:cat:cat"]) == 2
    assert "already a word" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "unconfused", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "smoke" in out.stdout
