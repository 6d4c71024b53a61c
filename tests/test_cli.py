"""The command line and the README's main job (the smoke run on built-in defaults)."""

import json
import subprocess
import sys

from unconfused.engine.data.concepts import load_concept_set
from unconfused.app.cli import main


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


def test_lora_command_trains_exports_and_resumes(tmp_path, dreambooth_dir, capsys):
    config = tmp_path / "job.toml"
    config.write_text(f'concepts = ["{dreambooth_dir / "cat"}:<my-cat>:cat"]\n'
                      '[settings]\nname = "cli"\nsteps = 3\nresolution = 64\ncheckpoint_every = 2\n')
    assert main(["lora", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["steps"] == 3 and report["resumed_from"] == 0
    assert (tmp_path / "models" / "loras" / "cli.safetensors").is_file()
    assert (tmp_path / "models" / "embeddings" / "cli_my-cat.safetensors").is_file()
    # the same command again finds the finished run and does not train again
    assert main(["lora", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    again = json.loads(out[out.index("{"):])
    assert again["resumed_from"] == 3 and again["final_loss"] == report["final_loss"]
    # a changed setting is refused for the same run name, with the fix in the message
    assert main(["lora", "--config", str(config), "--set", "rank=4"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["lora", "--config", str(config), "--set", "stepz=4"]) == 2
    assert "unknown settings" in capsys.readouterr().err
