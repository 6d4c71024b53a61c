"""`python -m unconfused captions check`: verdicts with reasons, folder of kohya sidecars, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from unconfused.app.cli import main

GOOD = "A <sks> dog sitting next to a black leather purse with silver hardware on white sheets."


def test_arguments_one_verdict_each_and_exit_code(capsys):
    rc = main(["captions", "check", "--token", "<sks>", "--class", "dog", GOOD,
               "A <sks> dog lying in a garden, its golden fur shining.", "A <sks> dog"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[0].startswith("ok ") and "argument 1" in out[0]
    assert out[2].startswith("FLAGGED") and "its golden fur" in out[2]
    assert out[4].startswith("FLAGGED") and "uninformative" in out[4] and "Minimum detail rule" in out[4]
    assert out[-1] == "3 captions: 1 ok, 0 repaired, 2 flagged"
    assert main(["captions", "check", "--token", "<sks>", "--class", "dog", GOOD]) == 0
    # a repaired caption is usable (exit 0) unless --strict; the fixed text is printed
    capsys.readouterr()
    args = ["captions", "check", "--token", "<sks>", "--class", "dog", "A brown dog on a red plaid blanket."]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "repaired" in out and "A <sks> dog on a red plaid blanket." in out and "dropped 'brown'" in out
    assert main(args + ["--strict"]) == 1
    # the Case 1 baseline on purpose
    assert main(["captions", "check", "--token", "<sks>", "--class", "dog", "--no-detail-rule", "a photo of <sks> dog"]) == 0


def test_folder_of_sidecars(tmp_path, capsys):
    sub = tmp_path / "10_sks dog"
    sub.mkdir()
    for name, caption in [("a.png", GOOD.replace("<sks>", "sks")), ("d.png", GOOD), ("b.jpg", "sks dog on a bed"),
                          ("c.png", None)]:
        Image.new("RGB", (8, 8)).save(sub / name)
        if caption is not None:
            (sub / name).with_suffix(".txt").write_text(caption + "\n")
    (sub / "notes.txt").write_text("not a caption")  # no image: not read
    rc = main(["captions", "check", "--token", "sks", "--class", "dog", "--folder", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.splitlines()
    assert "a.png" in lines[0] and lines[0].startswith("ok ")
    assert any("d.png" in ln and ln.startswith("repaired") and "as the token 'sks'" in ln for ln in lines)
    assert any("b.jpg" in ln and "uninformative" in ln for ln in lines)
    assert any("c.png" in ln and "no caption file" in ln for ln in lines)
    assert lines[-1] == "4 captions: 1 ok, 1 repaired, 2 flagged" and "notes" not in out


def test_bad_input_exit_2_and_the_module_entry_point(tmp_path, capsys):
    assert main(["captions", "check", "--token", "<sks>", "--class", "dog"]) == 2
    assert "no captions" in capsys.readouterr().err
    assert main(["captions", "check", "--token", "<sks>", "--class", "dog", "--folder", str(tmp_path / "nope")]) == 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-m", "unconfused", "captions", "check", "--token", "<sks>", "--class",
                           "dog", "A <sks> dog next to a red ball, with long floppy ears."],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("FLAGGED") and "with long floppy ears" in proc.stdout
