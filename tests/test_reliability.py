"""Issue 21: runs that cannot be mixed up or lost, every bad input a sentence, files others can
read, a CLI that answers at once. Disk faults are made with the real libraries failing (a full
tmpfs, a read-only remount) in tests/test_full_disk.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_bundle
from unconfused.engine import host
from unconfused.engine.data.concepts import Concept, make_concept_set
from unconfused.engine.errors import UnconfusedError
from unconfused.app.cli import main
from unconfused.trainers.loop import Loop, LoopState
from unconfused.trainers.lora import LoraSettings, LoraTrainer, data_fingerprint
from unconfused.engine.data.synthetic import synthetic_photos

REPO = Path(__file__).resolve().parents[1]


def _settings(**kw) -> LoraSettings:
    base = dict(name="t", steps=2, resolution=64, checkpoint_every=1, resume="auto", export=False)
    base.update(kw)
    return LoraSettings(**base)


def _concepts():
    return make_concept_set([Concept("<a>", "dog", synthetic_photos(0, 2, 96)),
                             Concept("<b>", "cat", synthetic_photos(1, 2, 96))])


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", UNCONFUSED_QUIET="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO.parent / f"{REPO.name}.pkg") + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------- 1. base-model identity
def test_base_model_is_identified_by_content_and_a_resume_on_another_is_refused(tmp_path):
    from unconfused.engine.models.demo import write_demo_diffusers_folder
    from unconfused.engine.models.loading import load_model

    a = load_model(write_demo_diffusers_folder(tmp_path / "a", seed=0))
    a2 = load_model(write_demo_diffusers_folder(tmp_path / "a2", seed=0))
    b = load_model(write_demo_diffusers_folder(tmp_path / "b", seed=1))
    assert a.base_hash == a2.base_hash != b.base_hash  # by content, not by name or place
    assert "unknown" not in (a.base_hash, b.base_hash)
    assert tiny_bundle(0).base_hash != tiny_bundle(1).base_hash  # in-memory models too
    assert a.clone().base_hash == a.base_hash
    cs = _concepts()
    LoraTrainer(a, cs, _settings(name="same")).run()
    with pytest.raises(UnconfusedError, match="another base model"):
        LoraTrainer(b, cs, _settings(name="same", steps=3)).run()


def test_class_images_are_cached_per_base_model(tmp_path):
    from unconfused.trainers.lora import class_image_examples

    s = _settings(class_images=1, validation_steps=1)
    class_image_examples(tiny_bundle(0), ["dog"], s, tmp_path / "c")
    class_image_examples(tiny_bundle(1), ["dog"], s, tmp_path / "c")
    assert len(list((tmp_path / "c").iterdir())) == 2  # one cache per model, never shared


# ---------------------------------------------------------------- 2. run-folder lock
def _loop(run_dir: Path, **kw) -> Loop:
    w = torch.nn.Parameter(torch.zeros(2))
    state = LoopState(lambda: {"w": w}, lambda d: None, torch.optim.SGD([w], lr=0.1))
    return Loop("test", 3, run_dir, {"a": 1}, state, **kw)


def test_a_second_run_of_the_same_folder_is_refused_and_a_dead_owner_is_taken_over(tmp_path):
    run = tmp_path / "run"
    # another process owns the folder (a live one: sleeping)
    owner = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
from unconfused.trainers.loop import RunLock
from pathlib import Path
import time
Path({str(run)!r}).mkdir(parents=True, exist_ok=True)
RunLock(Path({str(run)!r}), node="x").acquire(); print("locked", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(UnconfusedError, match="in use by another run"):
            _loop(run)
        owner.kill()
        owner.wait()
        loop = _loop(run)  # the owner died without releasing: taken over
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        loop.release()
        assert not (run / ".lock").exists()
    finally:
        owner.kill()
        owner.wait()


def test_the_lock_is_released_on_every_exit_path(tmp_path):
    from unconfused.engine.errors import Cancelled

    run = tmp_path / "run"
    for fault in (RuntimeError("boom"), Cancelled(), KeyboardInterrupt()):
        loop = _loop(run)

        def step(i, fault=fault):
            if i == 1:
                raise fault
            return 0.5
        with pytest.raises(type(fault)):
            loop.run(step)
        assert not (run / ".lock").exists(), type(fault)
        # a second run of the folder in this process: allowed (the first has stopped)
        _loop(run).release()
    done = _loop(run)
    done.run(lambda i: 0.5)
    del done  # a finished loop gives the folder free when it goes
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------- 3. data fingerprint by bytes
def test_data_fingerprint_does_not_depend_on_the_thread_count():
    from unconfused.engine.data.training_examples import examples_from_concept_set

    cs = make_concept_set([Concept("<a>", "dog", [torch.rand(96, 96, 3, generator=torch.Generator().manual_seed(i))
                                                  for i in range(6)])])
    ex = examples_from_concept_set(cs)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = data_fingerprint(ex)
        torch.set_num_threads(2)
        two = data_fingerprint(ex)
    finally:
        torch.set_num_threads(threads)
    assert one == two
    changed = list(ex)
    img = changed[0].image.clone()
    img[0, 0, 0] = torch.nextafter(img[0, 0, 0], torch.tensor(2.0))  # one float, one ulp: other bytes
    changed[0] = type(changed[0])(img, changed[0].caption, changed[0].mask, changed[0].tokens)
    assert data_fingerprint(changed) != one


# ---------------------------------------------------------------- 4, 5, 7. typed job values
def _job(tmp_path, text: str, suffix=".toml") -> Path:
    p = tmp_path / f"job{suffix}"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.mark.parametrize("settings_text, sets, message", [
    ('masked_loss = "no"', [], "'masked_loss' must be true or false"),
    ('validation_prompts = "a photo"', [], "'validation_prompts' must be a list of text"),
    ('steps = "ten"', [], "'steps' must be a whole number"),
    ('steps = 4.5', [], "'steps' must be a whole number"),
    ('seed = "abc"', [], "'seed' must be a whole number"),
    ('name = 5', [], "'name' must be text"),
    ('template = "a photo of {token} {nope}"', [], "input 'template'.*nope"),
    ('keep_checkpoints = 0', [], "input 'keep_checkpoints'"),
    ('checkpoint_every = -1', [], "input 'checkpoint_every'"),
    ('', ["flip=maybe"], "'flip' must be true or false"),
], ids=["bool-string", "list-string", "int-word", "int-fraction", "seed-word", "name-number", "template-field",
        "keep-0", "every-negative", "cli-bool"])
def test_wrong_setting_types_are_named(tmp_path, capsys, settings_text, sets, message):
    cfg = _job(tmp_path, f'concepts = "demo"\n[settings]\nsteps = 1\nresolution = 64\n{settings_text}\n'
               if "steps" not in settings_text else f'concepts = "demo"\n[settings]\nresolution = 64\n{settings_text}\n')
    args = ["lora", "--config", str(cfg)] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_settings_are_parsed_by_their_declared_type():
    from unconfused.trainers.loop import CliText

    s = LoraSettings.from_dict({"masked_loss": CliText("False"), "flip": CliText("no"), "steps": CliText("3e0"),
                                "resolution": 64.0, "name": CliText("run1"), "unet_lr": CliText("1e-3"),
                                "validation_prompts": CliText('["a photo of <a>"]')})
    assert (s.masked_loss, s.flip, s.steps, s.resolution, s.name) == (False, False, 3, 64, "run1")
    assert type(s.steps) is int and type(s.resolution) is int and s.unet_lr == 1e-3
    assert s.validation_prompts == ["a photo of <a>"]
    assert f"{s.steps:06d}" == "000003"  # item 5: an integral float never reaches a format code


@pytest.mark.parametrize("config, message", [
    ('model = 5\nconcepts = "demo"', "'model' in job.toml must be text"),
    ('concepts = [123]', "the concept 123"),
    ('concepts = [{folder = "x", token = "<a>"}]', "needs class_word"),
    ('concepts = []', "names no concepts"),
    ('[settings]\nsteps = 1', "names no concepts"),
    ('concepts = "demo"\nworkdir = "job.toml"', "workdir .* is a file"),
], ids=["model-number", "concept-number", "concept-without-class", "concepts-empty", "concepts-missing",
        "workdir-file"])
def test_wrong_job_file_types_are_sentences(tmp_path, capsys, config, message):
    import re

    assert main(["lora", "--config", str(_job(tmp_path, config))]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_config_file_kinds_are_named(tmp_path, capsys):
    assert main(["lora", "--config", str(_job(tmp_path, "steps: 4\n", ".yaml"))]) == 2
    assert "TOML (.toml) or JSON" in capsys.readouterr().err
    assert main(["lora", "--config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["eval", "--config", str(_job(tmp_path, 'masks_a = "a"\nmasks_b = "b"\n[settings]\n'
                                                        'region_threshold = "high"'))]) == 2
    assert "'region_threshold' must be a number" in capsys.readouterr().err


def test_smoke_refuses_a_zero_resolution(capsys):
    with pytest.raises(SystemExit) as e:
        main(["smoke", "--resolution", "0"])
    assert e.value.code == 2 and "multiple of 64" in capsys.readouterr().err


def test_float_steps_train_and_export(tmp_path, capsys):
    cfg = _job(tmp_path, 'concepts = "demo"\n[settings]\nname = "f"\nsteps = 2.0\nresolution = 64\n'
                         'checkpoint_every = 1\nvalidation_steps = 1\n')
    assert main(["lora", "--config", str(cfg)]) == 0
    assert (tmp_path / "models" / "loras" / "f.safetensors").is_file()
    assert main(["lora", "--config", str(cfg), "--set", "steps=2e0"]) == 0  # the rerun returns at once


# ---------------------------------------------------------------- 8. SIGTERM, a second Ctrl-C, .partial files
def _training_process(tmp_path, steps=400) -> tuple[subprocess.Popen, Path]:
    cfg = _job(tmp_path, f'concepts = "demo"\n[settings]\nname = "sig"\nsteps = {steps}\nresolution = 64\n'
                         'checkpoint_every = 3\n')
    p = subprocess.Popen([sys.executable, "-m", "unconfused", "lora", "--config", str(cfg)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    return p, tmp_path / "output" / "unconfused" / "runs" / "sig"


def _wait_for(pred, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_sigterm_writes_a_checkpoint_and_a_second_signal_prints_no_traceback(tmp_path):
    p, run = _training_process(tmp_path)
    try:
        assert _wait_for(lambda: list(run.glob("step_*.pt"))), "the run did not start"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM" in err
    ckpts = sorted(run.glob("step_*.pt"))
    last = int(ckpts[-1].stem.split("_")[1])
    assert 3 <= last < 400 and json.loads((run / "run.json").read_text())["last_step"] == last
    assert not (run / ".lock").exists()
    # twice: the first asks, the second stops at once, with a line instead of a traceback
    p, run = _training_process(tmp_path / "again")
    try:
        assert _wait_for(lambda: list(run.glob("step_*.pt")))
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err


def test_partial_files_of_a_killed_run_are_cleaned_up(tmp_path):
    from unconfused.engine.files import atomic_write_json

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [run / f".step_000004.pt.{dead.pid}-0123abcd.partial", run / ".run.json.1-deadbeef.partial"]
    for f in left:
        f.write_bytes(b"half")
    _loop(run).release()  # the next run of the folder removes them
    assert not any(f.exists() for f in left)
    # elsewhere (an export folder): only those of processes that ended
    out = tmp_path / "loras"
    out.mkdir()
    mine = out / f".x.safetensors.{os.getpid()}-0123abcd.partial"
    theirs = out / f".y.safetensors.{dead.pid}-0123abcd.partial"
    mine.write_bytes(b"")
    theirs.write_bytes(b"")
    atomic_write_json(out / "z.json", {})
    assert mine.exists() and not theirs.exists()


# ---------------------------------------------------------------- 10. file modes
def test_written_files_get_the_mode_the_umask_gives(tmp_path):
    from PIL import Image

    from unconfused.engine.files import atomic_save_image, atomic_save_safetensors, atomic_write_json

    old = os.umask(0o022)
    try:
        files = [atomic_save_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)}),
                 atomic_write_json(tmp_path / "b.json", {}), atomic_save_image(tmp_path / "c.png", Image.new("RGB", (2, 2)))]
        os.umask(0o027)
        files.append(atomic_save_safetensors(tmp_path / "d.safetensors", {"x": torch.zeros(2)}))
    finally:
        os.umask(old)
    assert [oct(f.stat().st_mode & 0o777) for f in files] == ["0o644", "0o644", "0o644", "0o640"]


# ---------------------------------------------------------------- 11, 12. the CLI
def test_demo_offers_the_options_its_messages_name(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--name", "--resume", "restart", "--seed", "--sample-steps", "default: 64", "default: auto"):
        assert option in text, option


def test_help_answers_without_importing_heavy_libraries():
    code = ("import sys, runpy\nsys.argv = ['unconfused', '--help']\n"
            "try:\n    runpy.run_module('unconfused', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'PIL', 'open_clip') "
            "if m in sys.modules)\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert "usage: python -m unconfused" in out.stdout, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-300:]


def test_the_cli_sets_thread_variables_before_torch_loads():
    code = ("import os, sys\nfrom unconfused.app.cli import main\n"
            "try:\n    main(['smoke', '--resolution', '0'])\nexcept SystemExit:\n    pass\n"
            "main(['lora', '--config', '/nonexistent.toml'])\n"
            "print('OMP', os.environ.get('OMP_NUM_THREADS'), 'TOK', os.environ.get('TOKENIZERS_PARALLELISM'))")
    env = {k: v for k, v in _env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    omp = out.stdout.split("OMP ")[1].split()[0]
    assert omp.isdigit() and int(omp) >= 1 and "TOK false" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_NUM_THREADS="3"), capture_output=True,
                         text=True, timeout=120)
    assert "OMP 3 " in out.stdout  # the user's choice wins


def test_thread_defaults_follow_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(7)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        n = host.apply_thread_defaults()
        from unconfused.engine.threads import available_cpus

        assert n == available_cpus() == torch.get_num_threads()  # an idle machine: every usable CPU
        monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
        assert host.apply_thread_defaults() == 1 == torch.get_num_threads()  # a saturated one: one thread
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert host.apply_thread_defaults() == 3  # the user's choice wins
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- 4. odd photos
def test_16_bit_grayscale_and_gif_photos_load_as_they_look(tmp_path):
    import numpy as np
    from PIL import Image

    from unconfused.engine.data.concepts import load_images_from_folder, pil_to_mask

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a_16bit.png")
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 200, 30))]
    frames[0].save(tmp_path / "b_anim.gif", save_all=True, append_images=frames[1:])
    images, names, _ = load_images_from_folder(tmp_path)
    assert names == ["a_16bit", "b_anim"]
    gray = images[0]
    assert gray.shape == (64, 64, 3) and abs(float(gray.mean()) - 0.5) < 0.01  # a ramp, not pure white
    assert float(gray.min()) == 0.0 and float(gray.max()) == 1.0
    assert images[1][0, 0, 0] > 0.7 and images[1][0, 0, 1] < 0.2  # the first frame (red)
    with Image.open(tmp_path / "a_16bit.png") as im:
        assert abs(float(pil_to_mask(im).mean()) - 0.5) < 0.01


# ---------------------------------------------------------------- 16. packaging, previews, Cancel inside a step
def test_the_package_builds_without_deprecation_or_ignored_folders(tmp_path):
    import shutil

    src = tmp_path / "src"  # setuptools builds inside the source folder: a copy keeps the checkout clean
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                            "tests", ".cache", "benchmarks"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", str(src),
                          "-w", str(tmp_path / "whl")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=dict(os.environ, PIP_NO_INDEX="1"))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-2000:]
    for noise in ("would be ignored", "project.license` as a TOML table is deprecated", "License classifiers"):
        assert noise not in log, noise
    import zipfile

    names = zipfile.ZipFile(next((tmp_path / "whl").glob("*.whl"))).namelist()
    assert "unconfused/web/unconfused.js" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert "unconfused/engine/evaluation/toyworld_weights/toy-sd/unet/config.json" in names  # the toy model ships


def test_preview_legends_draw_colours_and_never_split_a_token():
    from unconfused.engine.preview import PALETTE, grid, wrap

    assert wrap("a photo of <my-long-dog> and <my-other-cat>", 14) == ["a photo of", "<my-long-dog>", "and",
                                                                       "<my-other-cat>"]
    from PIL import Image

    sheet = grid([Image.new("RGB", (64, 64))], [[("<a>", PALETTE[0]), ("<b>", PALETTE[1])]], cell=128)
    colours = {c for _, c in sheet.getcolors(1 << 16)}
    assert tuple(PALETTE[0]) in colours and tuple(PALETTE[1]) in colours  # swatches, not "rgb(...)" text


def test_cancel_is_seen_inside_a_sampling_step():
    from unconfused.engine.models import sampling as S
    from unconfused.engine.errors import Cancelled

    bundle = tiny_bundle()
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1
        if calls["n"] == 1:  # as the first step's UNet starts
            host.request_cancel()
    assert len(bundle.unet.down_blocks) >= 2
    hooks = [b.register_forward_pre_hook(count) for b in bundle.unet.down_blocks]
    try:
        with pytest.raises(Cancelled):
            S.sample(bundle, "a photo", steps=5, width=64, height=64)
    finally:
        for x in hooks:
            x.remove()
    assert calls["n"] == 1  # stopped before the next block ran, not at the end of the step


# ---------------------------------------------------------------- 7. names and manifests
def test_a_too_long_token_or_name_is_refused_before_anything_is_written(tmp_path, capsys):
    from unconfused.engine.data.concepts import validate_token
    from unconfused.engine.files import atomic_write_json

    with pytest.raises(UnconfusedError, match="at most 64"):
        validate_token("<" + "a" * 258 + ">")
    with pytest.raises(UnconfusedError, match="at most 120"):
        LoraSettings(name="n" * 200).validated()
    photos = tmp_path / "p"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 0, 0)).save(photos / "a.png")
    cfg = _job(tmp_path, f'concepts = ["p:<{"x" * 258}>:dog"]\n[settings]\nsteps = 1\nresolution = 64\n')
    assert main(["lora", "--config", str(cfg)]) == 2
    assert "at most 64" in capsys.readouterr().err
    assert not (tmp_path / "models" / "loras").exists() or not any((tmp_path / "models" / "loras").iterdir())
    long = atomic_write_json(tmp_path / ("f" * 240 + ".json"), {})  # a long final name still gets its temp name
    assert long.is_file()


def test_a_concept_set_entry_without_folder_is_a_sentence(tmp_path):
    from unconfused.engine.data.concepts import load_concept_set

    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "concept_set.json").write_text(json.dumps(
        {"format": "unconfused.concept_set", "version": 1, "concepts": [{"token": "<a>", "class_word": "dog",
                                                                         "images": ["a.png"]}]}))
    with pytest.raises(UnconfusedError, match="lacks folder"):
        load_concept_set(tmp_path / "set")


def test_a_corrupt_mask_in_eval_is_a_sentence_and_a_huge_resolution_is_warned(tmp_path, capsys, caplog):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = _job(tmp_path, 'masks_a = "a"\nmasks_b = "b"\n')
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the mask" in err and "Traceback" not in err
    import logging

    with caplog.at_level(logging.WARNING, logger="unconfused"):
        LoraSettings.from_dict({"resolution": 4096})
    assert "resolution 4096" in caplog.text


# ---------------------------------------------------------------- 15. benchmarks that hold still
def test_run_all_flags_a_ratio_whose_rounds_disagree_more_than_it_claims():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _results import headline, interleaved, ratio_spread, unsteady
    from run_all import _ratio

    steady = headline("k", "w", 0.5, 1.0, "s", 0.5, "x ref", spread=ratio_spread([0.50, 0.52, 0.49], [1.0, 1.0, 1.0]))
    shaky = headline("k", "w", 1.0, 1.0, "s", 1.0, "x ref", spread=ratio_spread([0.45, 1.0, 2.26], [1.0, 1.0, 1.0]))
    assert not unsteady(steady) and unsteady(shaky)
    assert "UNSTEADY" in _ratio(shaky) and "rounds 0.45 / 1.00 / 2.26" in _ratio(shaky)
    assert "UNSTEADY" not in _ratio(steady)
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"] and all(len(v) == 2 for v in times.values())
