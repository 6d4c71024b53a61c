"""The main job. Without files (issue 20 item 5) it trains two concepts of the toy world and its
oracle measures their confusion before and after CLIF. On the user's files (issue 17 item 2):
`demo --ckpt ...` runs a preset at the model's native resolution with a bank drawn by the user's model
(cached), R-Aug with SAM, flags and a job file for counts and steps, and a time estimate from the
first steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from unconfused.engine.errors import UnconfusedError
from unconfused.engine.presets import PRESETS
from unconfused.app.cli import main
from unconfused.app.flow import DEMO_VALUES, FlowSettings, make_plan
from unconfused.app.jobs import demo_settings


def test_with_a_checkpoint_the_plan_is_the_quick_preset_at_the_native_resolution():
    plan = make_plan(FlowSettings(ckpt=Path("v1-5.safetensors")), 512, with_sam=False)
    quick = {k: v.value for k, v in PRESETS["clif"]["quick"].items()}
    assert plan.mode == "quick" and plan.resolution == 512 and plan.lora.resolution == 512
    assert plan.augment.canvas == 512 and plan.sample_size == 512 and plan.bank.size == 512
    assert plan.clif.preset == "quick" and plan.clif.steps == quick["steps"] and plan.clif.train == quick["train"]
    assert plan.lora.preset == "quick" and plan.lora.steps == PRESETS["lora"]["quick"]["steps"].value
    assert plan.augment.global_pairs == DEMO_VALUES["quick"]["pairs"] and plan.augment.region_pairs == 0
    assert plan.bank.per_concept == DEMO_VALUES["quick"]["bank_images"]
    # R-Aug turns on with a SAM; --resolution wins over the family's size; paper has the paper's counts
    sam = make_plan(FlowSettings(ckpt=Path("m"), resolution=640), 512, with_sam=True)
    assert sam.augment.region_pairs == DEMO_VALUES["quick"]["region_pairs"] > 0 and sam.resolution == 640
    paper = make_plan(FlowSettings(ckpt=Path("m"), preset="paper"), 768, with_sam=True)
    assert (paper.resolution, paper.clif.steps, paper.clif.batch_size, paper.augment.global_pairs,
            paper.augment.region_pairs, paper.bank.per_concept) == (768, 78125, 128, 40000, 10000, 20)
    # explicit counts and stage settings win over the preset
    mine = make_plan(FlowSettings(ckpt=Path("m"), pairs=10, clif_steps=7, lora_steps=9, bank_images=2,
                                  overrides={"clif.batch_size": 4, "lora": {"rank": 4}}), 512, with_sam=False)
    assert (mine.augment.global_pairs, mine.clif.steps, mine.clif.batch_size, mine.lora.steps, mine.lora.rank,
            mine.bank.per_concept) == (10, 7, 4, 9, 4, 2)
    # without files: the toy world's values (64 px, its sampler settings), its own bank of world objects
    from unconfused.engine.evaluation import toyworld as tw

    builtin = make_plan(FlowSettings(), 512, with_sam=False)
    assert (builtin.mode, builtin.resolution, builtin.sample_size, builtin.augment.global_pairs, builtin.clif.steps,
            builtin.lora.steps, builtin.lora.rank, builtin.bank) == ("built-in", 64, 64, 48, 60, 150, 4, None)
    assert builtin.sampling == {"cfg": 4.0, "scheduler": "ddim", "negative": ""} and plan.sampling == {}
    assert builtin.clif.learning_rate == tw.CLIF["learning_rate"] and builtin.lora.unet_lr == tw.LORA["unet_lr"]


def test_the_builtin_demo_trains_two_toy_concepts_and_the_oracle_measures_them(tmp_path, capsys):
    """The README's main job with fewer steps, on the toy world: every stage runs, the pictures and the
    report are written, the oracle's measures before and after CLIF are in it, and the trained tokens
    draw their concepts: each concept alone comes out in its own colour (with 40 LoRA steps all 4
    pictures of seed 0 do; the untrained tokens drew them in 1 of 12, docs/toyworld.md). A rerun
    resumes every stage and reads the finished pictures and measures."""
    from PIL import Image

    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--clif-steps", "10", "--lora-steps", "40", "--sample-steps", "10",
            "--set", "oracle_images=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((work / "report.json").read_text())
    assert report["model"] == "toy-sd" and report["plan"]["mode"] == "built-in"
    assert list(report["stages"]) == ["load model", "load clip", "concepts and cut-outs", "augmentations",
                                      "CLIF text encoder", "LoRA + tokens", "sample", "evaluate", "oracle"]
    assert report["stages"]["augmentations"]["pairs"] == {"global": 48, "mix": 24}
    sample = report["stages"]["sample"]
    assert sample["prompt"] == "a photo of <a-ball> ball and <b-ball> ball on snow"
    assert sample["attention_tokens"] == ["<a-ball>", "<b-ball>"]
    # 4 two-concept pictures + each concept alone, enlarged from 64 px to be seen
    width, height = Image.open(work / "samples.png").size  # two rows of 256 px cells with captions
    assert width == 4 * 256 and 2 * 256 < height < 3 * 256
    assert (work / "attention.png").is_file()
    ev = report["stages"]["evaluate"]  # the pack's own metrics with the toy CLIP
    assert {"clip_t[all]", "clip_i_single[all]", "clip_i_multi[all]", "attendance[all]"} <= set(ev["rows"]), ev
    assert len(json.loads((work / "eval" / "report.json").read_text())["per_image"]) == 6
    oracle = report["stages"]["oracle"]
    assert oracle["images"] == 4 and "no CLIF" in oracle["before"]
    for when in ("before_clif", "after_clif"):
        assert {"both", "both_colour", "confusion_degree_colour", "leak_rate_colour", "leakage_colour",
                "colour_fidelity"} <= set(oracle[when])
        assert 0 <= oracle[when]["confusion_degree_colour"] <= 1
    for name in ("a-ball", "b-ball"):
        assert oracle["after_clif"][f"colour_fidelity_{name}"] >= 0.75, oracle["after_clif"]
    assert "before CLIF  after CLIF" in out and "confusion degree (colour" in out
    assert (work / "models" / "loras" / "demo-lora.safetensors").is_file()
    assert (work / "models" / "loras" / "demo-baseline.safetensors").is_file()
    # a rerun resumes every stage: nothing is trained or drawn again, the same numbers come back
    assert main(args) == 0
    again = json.loads((work / "report.json").read_text())["stages"]
    assert again["CLIF text encoder"]["resumed_from"] == 10 and again["LoRA + tokens"]["resumed_from"] == 40
    assert again["sample"]["reused"] and again["evaluate"]["reused"] and again["oracle"]["reused"]
    assert again["oracle"]["after_clif"] == oracle["after_clif"] and again["evaluate"]["rows"] == ev["rows"]
    # another run name in the same workdir is a separate run
    assert main(args + ["--name", "other", "--resume", "restart", "--clif-steps", "2", "--lora-steps", "3",
                        "--sample-steps", "2"]) == 0
    other = json.loads((work / "report.json").read_text())["stages"]
    assert other["LoRA + tokens"]["resumed_from"] == 0 and not other["sample"].get("reused")
    assert (work / "models" / "loras" / "other-lora.safetensors").is_file()


@pytest.mark.parametrize("settings, message", [
    (FlowSettings(overrides={"unet.rank": 4}), "neither a setting of the demo .* nor STAGE.KEY"),
    (FlowSettings(overrides={"clif.stepz": 4}), "stepz"),
    (FlowSettings(overrides={"lora.rank": "many"}), "'rank' must be a whole number"),
    (FlowSettings(preset="fast"), "not a preset of the demo"),
    (FlowSettings(resolution=100), "multiple of 64"),
    (FlowSettings(ckpt=Path("m"), bank_images=0), "--bank-images must be 1 or more"),
])
def test_bad_demo_settings_are_refused_with_sentences(settings, message):
    with pytest.raises(UnconfusedError, match=message):
        make_plan(settings, 512, with_sam=False)


def test_bad_flags_and_job_files_give_sentences(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--set", "clif.steps=ten"]) == 2
    assert "'steps' must be a whole number" in capsys.readouterr().err
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--set", "nonsense"]) == 2
    assert "is not key=value" in capsys.readouterr().err
    job = tmp_path / "job.toml"
    job.write_text('preset = "fast"\n')
    assert main(["demo", "--config", str(job)]) == 2
    assert "not a preset of the demo; choose one of quick, paper, custom" in capsys.readouterr().err
    job.write_text('[settings]\nstepz = 3\n')
    assert main(["demo", "--config", str(job)]) == 2
    assert "'stepz' is neither a setting of the demo (resolution, pairs," in capsys.readouterr().err
    job.write_text('[settings]\nclif_steps = "many"\n')
    assert main(["demo", "--config", str(job)]) == 2
    assert "'clif_steps' must be a whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--pairs", "-1"])
    assert "must be 0 or more" in capsys.readouterr().err


def test_the_job_file_gives_the_same_settings_as_the_flags(tmp_path):
    (tmp_path / "photos" / "rex").mkdir(parents=True)
    job = tmp_path / "job.toml"
    job.write_text('model = "models/v1-5.safetensors"\nclip = "clip.safetensors"\nsam = "sam_vit_b.pth"\n'
                   'concepts = ["photos/rex:<rex>:dog"]\nworkdir = "run"\npreset = "paper"\nprompt = "<rex> runs"\n'
                   '[settings]\npairs = 100\nbank_images = 3\nclif_steps = 12\nlora_steps = 34\nresolution = 576\n'
                   '"augment.mix_per_pair" = 2\n[settings.clif]\nbatch_size = 16\n')
    from_file = demo_settings(job, ["lora.rank=4", "seed=3"])
    from unconfused.app.smoke import ConceptSpec

    flags = {"workdir": tmp_path / "run", "ckpt": tmp_path / "models" / "v1-5.safetensors",
             "clip": tmp_path / "clip.safetensors", "sam": tmp_path / "sam_vit_b.pth",
             "concepts": [ConceptSpec(tmp_path / "photos" / "rex", "<rex>", "dog")], "preset": "paper", "pairs": 100,
             "bank_images": 3, "clif_steps": 12, "lora_steps": 34, "resolution": 576, "seed": 3,
             "prompt": "<rex> runs"}
    from_flags = demo_settings(None, ["augment.mix_per_pair=2", "clif.batch_size=16", "lora.rank=4"], flags)
    a, b = make_plan(from_file, 512, True), make_plan(from_flags, 512, True)
    assert a.summary() == b.summary() and a.summary()["clif"]["batch_size"] == 16
    from dataclasses import replace

    # every setting, paths and concepts included; the stages' own settings as typed (TOML) or text (--set)
    assert replace(from_file, overrides={}) == replace(from_flags, overrides={})
    assert sorted(from_file.overrides) == sorted(from_flags.overrides) == ["augment.mix_per_pair",
                                                                           "clif.batch_size", "lora.rank"]
    # a flag wins over the job file
    assert demo_settings(job, [], {"clif_steps": 5}).clif_steps == 5


def test_the_demo_on_a_users_checkpoint_runs_the_preset_with_a_cached_bank(tmp_path, capsys, monkeypatch):
    """The tiny demo model written as a diffusers folder is the user's checkpoint. Its family's native
    size is patched to 64 px (the real one, 512, is too slow for a test): the plan must take it."""
    from unconfused.engine.models import families, sampling
    from unconfused.engine.models.demo import write_demo_diffusers_folder

    monkeypatch.setattr(families.SD1, "default_resolution", lambda self, bundle: 64)
    drawn = []
    real_generate = sampling.generate

    def counting(bundle, prompts, *a, **kw):
        if str(kw.get("desc", "")).startswith("common concepts"):
            drawn.extend(prompts)
        return real_generate(bundle, prompts, *a, **kw)

    monkeypatch.setattr(sampling, "generate", counting)
    ckpt = write_demo_diffusers_folder(tmp_path / "user-model")
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--ckpt", str(ckpt), "--pairs", "8", "--bank-images", "2",
            "--clif-steps", "3", "--lora-steps", "3", "--sample-steps", "2", "--set", "clif.batch_size=4",
            "--set", 'bank.phrases=["a policeman", "a red car"]', "--set", "bank.steps=2"]
    assert main(args) == 0
    out = capsys.readouterr()
    report = json.loads((work / "report.json").read_text())
    assert report["plan"]["mode"] == "quick" and report["plan"]["resolution"] == 64
    # the preset's values, as each trainer recorded them in its run folder
    clif = json.loads((Path(report["files"]["clif_run"]) / "settings.json").read_text())
    lora = json.loads((Path(report["files"]["lora_run"]) / "settings.json").read_text())
    assert clif["preset"] == "quick" and clif["settings"]["train"] == "tokens" and clif["settings"]["token_lr"] == 5e-4
    assert clif["settings"]["batch_size"] == 4 and clif["from"]["batch_size"] == "user"
    assert lora["preset"] == "quick" and lora["settings"]["min_snr_gamma"] == 5.0
    assert lora["from"]["unet_lr"] == "preset"
    assert lora["settings"]["resolution"] == 64
    # the bank: drawn by the user's model (2 concepts x 2 images), cached by the model's hash
    assert len(drawn) == 4 and report["stages"]["common-concept bank"]["images"] == 4
    bank_dir = Path(report["stages"]["common-concept bank"]["folder"])
    from unconfused.engine.models.loading import load_model

    assert bank_dir.name == load_model(ckpt).base_hash
    pngs = sorted(p for p in bank_dir.glob("*/*.png") if p.parent.name != "mattes")
    stamps = [p.stat().st_mtime_ns for p in pngs]
    assert len(pngs) == 4
    # the time estimate of each training stage is said
    assert "CLIF: " in out.err and " s/step -> about " in out.err and "LoRA: " in out.err
    assert "common-concept bank: " in out.err and " s/image -> about " in out.err
    assert report["estimates"]["CLIF"].startswith("CLIF: ")
    # a rerun reuses the bank: nothing drawn again, no file rewritten
    assert main(args) == 0
    assert len(drawn) == 4 and [p.stat().st_mtime_ns for p in pngs] == stamps


def test_a_sam_turns_region_pairs_on_in_the_run(tmp_path, monkeypatch):
    """--sam: the run makes R-Aug pairs with SAM's region proposals (the random tiny SAM proposes none
    that pass its quality checks, so its automatic mode is replaced by horizontal bands here)."""
    import torch
    from sam_helpers import tiny_sam_state_dict
    from unconfused.engine.vision import regions

    monkeypatch.setenv("UNCONFUSED_SAM_ALLOW_CUSTOM", "1")
    used = []

    def bands(rgb, mask):
        ys = torch.nonzero(mask >= 0.5)[:, 0]
        y0, y1 = int(ys.min()), int(ys.max()) + 1
        return [torch.zeros_like(mask).index_fill_(0, torch.arange(y0 + (y1 - y0) * b // 3,
                                                                  y0 + (y1 - y0) * (b + 1) // 3), 1) * (mask >= 0.5)
                for b in range(3)]

    def tools(sam_model, clip_model):
        used.append(type(sam_model).__name__)
        return bands, lambda crops, words: [(words[i % len(words)], 1.0) for i in range(len(crops))]

    monkeypatch.setattr(regions, "region_tools", tools)
    torch.save(tiny_sam_state_dict(), tmp_path / "sam_vit_b_01ec64.pth")
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--sam", str(tmp_path / "sam_vit_b_01ec64.pth"), "--region-pairs",
                 "4", "--set", "augment.min_regions=2", "--clif-steps", "2", "--lora-steps", "2",
                 "--sample-steps", "2"]) == 0
    report = json.loads((work / "report.json").read_text())
    assert used == ["SamModel"] and report["stages"]["augmentations"]["pairs"]["region"] == 4
    # without the SAM the same flags make no region pairs
    plan = make_plan(FlowSettings(region_pairs=4), 512, with_sam=False)
    assert plan.augment.region_pairs == 0


def test_the_estimate_is_the_time_per_step_after_the_first_step_times_the_steps(monkeypatch):
    from unconfused.app import flow

    clock = iter([0.0, 10.0, 14.0, 20.0])  # begin, step 1 (warm-up), step 3 (too early), step 6
    monkeypatch.setattr(flow.time, "perf_counter", lambda: next(clock))
    said = []
    timer = flow.StepTimer(5, said.append)
    timer.begin("CLIF")
    for step in (1, 3, 6):
        timer("unconfused.train", {"step": step, "total": 1000})
    timer("unconfused.train", {"step": 7, "total": 1000})  # said once per stage
    assert said == ["CLIF: 2.00 s/step -> about 33 min for 1000 steps (measured over steps 2-6)"]
    assert timer.estimates["CLIF"]["seconds_per_step"] == 2.0
    clock2 = iter([0.0, 3.0, 13.0])
    monkeypatch.setattr(flow.time, "perf_counter", lambda: next(clock2))
    timer.begin("common-concept bank")
    for done in (4, 9):
        timer("unconfused.augment.bank", {"done": done, "total": 400})
    assert said[-1] == "common-concept bank: 2.00 s/image -> about 13 min for 400 images (measured over images 5-9)"
