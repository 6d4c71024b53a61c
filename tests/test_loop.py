"""The training loop's checkpoints: loaded with weights_only (no pickled code runs on resume), every
random generator restored exactly, and an unreadable or foreign checkpoint set aside, not deleted."""

from __future__ import annotations

import random

import numpy as np
import torch

from unconfused.trainers.loop import Loop, LoopState, rng_state, set_rng_state


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state too
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    first = draws()
    set_rng_state(torch.load(path, weights_only=True))
    assert draws() == first


class Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(MARKER),))


MARKER = ""


def make_loop(run_dir) -> tuple[Loop, torch.nn.Parameter]:
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    state = LoopState(lambda: {"w": w.detach()}, lambda d: w.data.copy_(d["w"]), opt,
                      generator=torch.Generator().manual_seed(0))
    return Loop("test", 10, run_dir, {"a": 1}, state), w


def test_resume_never_unpickles_code_and_keeps_the_unreadable_file(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    loop, w = make_loop(tmp_path / "run")
    w.data.fill_(1.5)
    loop.losses = [0.5, 0.4]
    good = loop.save_checkpoint(2)
    # a newer "checkpoint" that would run code when unpickled (e.g. a shared run folder)
    torch.save({"step": 5, "payload": Evil()}, tmp_path / "run" / "step_000005.pt")
    (tmp_path / "run" / "step_000004.pt").write_bytes(b"PK\x03\x04 damaged")

    again, w2 = make_loop(tmp_path / "run")
    assert again.resume() == 2
    assert torch.equal(w2.detach(), torch.full((3,), 1.5)) and again.losses == [0.5, 0.4]
    assert not (tmp_path / "pwned").exists()  # the pickled call never ran
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "step_000005.pt.unreadable" in kept and "step_000004.pt.unreadable" in kept and good.name in kept
    assert [p.name for p in again.checkpoints()] == [good.name]
