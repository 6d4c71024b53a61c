"""The training loop skeleton every trainer shares: seeding, progress and loss to the UI,
Cancel, checkpoints every N steps, exact resume, loss history.

A trainer supplies `step_fn(step) -> loss` and the state to save (its trainable tensors,
optimizer, LR schedule, data generator). Resume restores all of it, including every random
number generator, so N steps + resume to 2N gives the same weights as 2N uninterrupted.
A Cancel or crash writes a checkpoint of the last finished step before it propagates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engine import host, messages
from ..engine.errors import UnconfusedError
from ..engine.files import atomic_path, atomic_write_json

log = logging.getLogger("unconfused")
CKPT_RE = re.compile(r"^step_(\d{6,})\.pt$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_from_dict(cls, data: dict, node: str):
    """A trainer's settings dataclass from a config's [settings] table: unknown keys are named,
    then the class's own `validated(node)` checks the values."""
    from dataclasses import fields

    from ..engine.presets import with_preset

    data = with_preset(cls, data, node=node)  # a named preset's values, under the table's own
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UnconfusedError(f"unknown settings {unknown}; known: {sorted(known)}", node=node, input="config")
    return cls(**data).validated(node)


def rng_state() -> dict:
    """Every random generator's state as plain ints, floats and tensors, so a checkpoint loads
    with `torch.load(weights_only=True)`: no pickled code runs when a run resumes."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoopState:
    """What a trainer hands the loop to save and restore."""

    get_trainables: Callable[[], dict[str, torch.Tensor]]
    set_trainables: Callable[[dict[str, torch.Tensor]], None]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object | None = None
    generator: torch.Generator | None = None  # the data/noise generator
    scaler: object | None = None  # fp16's torch.amp.GradScaler (its scale is part of the state)


@dataclass
class Loop:
    name: str  # node id or command, for messages
    total_steps: int
    run_dir: Path
    config: dict  # the settings that must match for a resume
    state: LoopState
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    on_step: Callable[[int, float], None] | None = None  # e.g. validation images every N steps
    is_main: bool = True  # with several processes (torchrun) only the main one writes checkpoints

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UnconfusedError(f"cannot create the run folder {self.run_dir} ({e.strerror or e}); check that the "
                                  "output folder is writable and the disk is not full", node=self.name,
                                  input="name") from e
        self._limiter = host.RateLimiter(0.25)

    # -------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.run_dir.glob("step_*.pt") if (m := CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save_checkpoint(self, step: int) -> Path | None:
        if not self.is_main:
            return None
        payload = {
            "step": step, "config_hash": config_hash(self.config), "losses": list(self.losses),
            "trainables": {k: v.detach().cpu().clone() for k, v in self.state.get_trainables().items()},
            "optimizer": self.state.optimizer.state_dict(),
            "lr_scheduler": self.state.lr_scheduler.state_dict() if self.state.lr_scheduler else None,
            "generator": self.state.generator.get_state() if self.state.generator is not None else None,
            "scaler": self.state.scaler.state_dict() if self.state.scaler is not None else None,
            "rng": rng_state(),
        }
        path = self.run_dir / f"step_{step:06d}.pt"
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        atomic_write_json(self.run_dir / "run.json", {"config": self.config, "config_hash": config_hash(self.config),
                                                      "last_step": step, "total_steps": self.total_steps})
        for old in self.checkpoints()[:-self.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def resume(self) -> int:
        """Restore the newest checkpoint of this run; returns the step to continue from."""
        ckpts = self.checkpoints()
        if not ckpts:
            return 0
        path = ckpts[-1]
        try:
            # tensors and plain values only: a checkpoint someone swapped in cannot run code
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged (or not ours): set aside, fall back to the one before
            aside = path.with_name(path.name + ".unreadable")
            log.warning("checkpoint %s is unreadable (%s); kept as %s, trying the previous one", path.name,
                        str(e).splitlines()[0][:200], aside.name)
            path.replace(aside)
            return self.resume()
        if payload["config_hash"] != config_hash(self.config):
            raise UnconfusedError(f"the run folder {self.run_dir.name} holds checkpoints made with other settings; "
                                  "choose another run name, or set resume to 'restart' to start over",
                                  node=self.name, input="run_name")
        self.state.set_trainables(payload["trainables"])
        self.state.optimizer.load_state_dict(payload["optimizer"])
        if self.state.lr_scheduler is not None and payload["lr_scheduler"] is not None:
            self.state.lr_scheduler.load_state_dict(payload["lr_scheduler"])
        if self.state.generator is not None and payload["generator"] is not None:
            self.state.generator.set_state(payload["generator"])
        if self.state.scaler is not None and payload.get("scaler"):
            self.state.scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        self.losses = list(payload["losses"])
        self.start_step = int(payload["step"])
        log.info("%s: resumed from %s", self.name, path.name)
        return self.start_step

    def clear(self) -> None:
        for p in self.checkpoints():
            p.unlink()

    # -------------------------------------------------------------- the loop
    def run(self, step_fn: Callable[[int], float]) -> list[float]:
        step = self.start_step
        bar = host.progress(self.total_steps, self.name)
        bar.set(step)
        t0, done_here = time.perf_counter(), 0
        try:
            while step < self.total_steps:
                loss = float(step_fn(step))
                if loss != loss:  # NaN: stop before it spreads into the weights on disk
                    raise UnconfusedError(f"the loss became NaN at step {step + 1}; lower the learning rate or use "
                                          "fp32/bf16 precision", node=self.name, input="learning_rate")
                step += 1
                done_here += 1
                self.losses.append(loss)
                self._report(step, loss, t0, done_here)
                if self.on_step is not None:
                    self.on_step(step, loss)
                if self.checkpoint_every and step % self.checkpoint_every == 0 and step < self.total_steps:
                    self.save_checkpoint(step)
                bar.set(step)  # also raises on Cancel
        except BaseException:
            if step > self.start_step and (not self.checkpoints() or
                                           not self.checkpoints()[-1].name.endswith(f"{step:06d}.pt")):
                self.save_checkpoint(step)  # nothing lost: a rerun resumes here
            raise
        finally:
            bar.close()
        return self.losses

    def _report(self, step: int, loss: float, t0: float, done_here: int) -> None:
        last = step == self.total_steps
        if not self._limiter.ready(force=last):
            return
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(done_here, 1) * (self.total_steps - step)
        lr = self.state.optimizer.param_groups[0]["lr"]
        messages.send_train(self.name, step, self.total_steps, loss, lr, eta)
