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


def test_demo_runs_the_whole_clif_flow_on_builtin_defaults(tmp_path, capsys):
    """The README's main job, with fewer steps: every stage runs and writes its files."""
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--clif-steps", "3", "--lora-steps", "3"]) == 0
    report = json.loads((work / "report.json").read_text())
    assert list(report["stages"]) == ["load model", "load clip", "concepts and cut-outs", "augmentations",
                                      "CLIF text encoder", "LoRA + tokens", "sample", "evaluate"]
    assert report["stages"]["augmentations"]["pairs"] == {"global": 24, "mix": 12}
    assert report["stages"]["sample"]["attention_tokens"] == ["<red-thing>", "<blue-thing>"]
    assert (work / "samples.png").is_file() and (work / "attention.png").is_file()
    ev = report["stages"]["evaluate"]  # the papers' metrics on the pictures, with the sampler's maps as regions
    assert {"clip_t[all]", "clip_i_single[all]", "clip_i_multi[all]", "subject_alignment[all]",
            "attendance[all]", "region_accuracy[all]"} <= set(ev["rows"]), ev
    assert sum(map(sum, ev["confusion"])) >= 2 and "plain cosine" in ev["convention"]
    saved = json.loads((work / "eval" / "report.json").read_text())
    assert len(saved["per_image"]) == 4 and (work / "eval" / "confusion.png").is_file()
    assert (work / "models" / "loras" / "demo-lora.safetensors").is_file()
    assert (work / "models" / "embeddings" / "demo-lora_red-thing.safetensors").is_file()
    # a rerun resumes every stage: nothing is trained again
    assert main(["demo", "--workdir", str(work), "--clif-steps", "3", "--lora-steps", "3"]) == 0
    again = json.loads((work / "report.json").read_text())["stages"]
    assert again["CLIF text encoder"]["resumed_from"] == 3 and again["LoRA + tokens"]["resumed_from"] == 3
    # finished sampling and evaluation return at once too (issue 21), with the same numbers
    assert again["sample"]["reused"] and again["evaluate"]["reused"]
    assert again["evaluate"]["rows"] == ev["rows"] and again["sample"]["attention_overlap"] == \
        report["stages"]["sample"]["attention_overlap"]
    # another run name in the same workdir is a separate run (the option the refusal names)
    assert main(["demo", "--workdir", str(work), "--clif-steps", "3", "--lora-steps", "3", "--name", "other",
                 "--resume", "restart", "--sample-steps", "2"]) == 0
    other = json.loads((work / "report.json").read_text())["stages"]
    assert other["LoRA + tokens"]["resumed_from"] == 0 and not other["sample"].get("reused")
    assert (work / "models" / "loras" / "other-lora.safetensors").is_file()
    assert "report written" in capsys.readouterr().out
