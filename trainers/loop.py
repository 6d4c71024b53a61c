"""The training loop skeleton every trainer shares: seeding, progress and loss to the UI,
Cancel, checkpoints every N steps, exact resume, loss history.

A trainer supplies `step_fn(step) -> loss` and the state to save (its trainable tensors,
optimizer, LR schedule, data generator). Resume restores all of it, including every random
number generator, so N steps + resume to 2N gives the same weights as 2N uninterrupted.
A Cancel or crash writes a checkpoint of the last finished step before it propagates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import logging
import random
import re
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..engine import host, messages
from ..engine.errors import UnconfusedError
from ..engine.files import atomic_path, atomic_write_json, clean_stale_partials, process_alive

log = logging.getLogger("unconfused")
CKPT_RE = re.compile(r"^step_(\d{6,})\.pt$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CliText(str):
    """A value typed on the command line (`--set key=value`): parsed by the setting's declared
    type, so `--set flip=no` is False and `--set name=x` needs no quotes."""


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _type_name(tp) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        tp, "a list of text, e.g. [\"a photo of <alice>\"]" if tp == list[str] else str(tp))


def parse_setting(key: str, value, tp, *, input: str | None = None):
    """`value` as the declared type `tp`, or a sentence naming the key and the type.

    Whole numbers accept an integral float (4.0, 3e0 -> 4, 3: TOML and JSON readers give floats
    for these) and refuse anything else (4.5, "ten"); true/false accept only booleans, or from
    the command line true/false/yes/no/1/0/on/off; a list of text refuses a bare string (which
    would otherwise become one entry per character)."""
    import math

    def bad():
        raise UnconfusedError(f"'{key}' must be {_type_name(tp)}, not {value!r}", input=input or key)

    cli = isinstance(value, CliText)
    if cli and tp is not str:
        text = value.strip()
        if tp is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            bad()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if tp in (int, float):
                with_number = text.replace("_", "")
                try:
                    value = float(with_number)
                except ValueError:
                    bad()
    elif cli:  # text: as typed, or a quoted JSON string
        if value[:1] == '"':
            with contextlib.suppress(json.JSONDecodeError):
                return str(json.loads(value))
        return str(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        bad()
    if tp is int:
        if isinstance(value, bool):
            bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        bad()
    if tp is str:
        if isinstance(value, str):
            return str(value)
        bad()
    if tp == list[str]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        bad()
    return value


def settings_from_dict(cls, data: dict, node: str | None = None):
    """A trainer's settings dataclass from a config's [settings] table: unknown keys are named,
    every value is parsed by its declared type (`parse_setting`), then the class's own
    `validated(node)` (where it has one) checks the values."""
    if node is not None:  # a caller not yet on the running-node context (app/flow.py)
        with host.running_node(host.current_node(), name=node):
            return settings_from_dict(cls, data)
    import typing
    from dataclasses import fields

    from ..engine.presets import with_preset

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UnconfusedError(f"unknown settings {unknown}; known: {sorted(known)}", input="config")
    hints = typing.get_type_hints(cls)
    values = {k: parse_setting(k, v, hints.get(k)) for k, v in data.items()}
    values = with_preset(cls, values)  # a named preset's values, under the table's own
    for key, text in values.items():  # caption templates: a misspelt field is named here, not mid-run
        if key.endswith("template") and isinstance(text, str):
            try:
                text.format(token="<t>", class_word="c")
            except (KeyError, IndexError, ValueError) as e:
                raise UnconfusedError(f"'{text}' uses {e}, which templates do not know; use {{token}} and "
                                      "{class_word} (write {{ and }} for braces)", input=key) from e
    if isinstance(values.get("resolution"), int) and values["resolution"] > 2048:
        log.warning("%s: resolution %d is far above what SD 1.x/2.x were trained at (512/768): memory and time grow "
                    "with its square (%.0fx of 512) and the model has never seen such pictures", host.current_node_name() or cls.__name__,
                    values["resolution"], (values["resolution"] / 512) ** 2)
    made = cls(**values)
    return made.validated() if hasattr(made, "validated") else made


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


_TOKEN = uuid.uuid4().hex  # this process, as opposed to an earlier one that had the same pid
_RUNNING: set[str] = set()  # run folders whose loop runs in this process now


def _start_time(pid: int) -> str:
    """When process `pid` started (Linux), to tell a live owner from a new process that got a
    dead owner's pid; '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


class RunLock:
    """`<run folder>/.lock`: which process owns the run folder. A second run of the same folder
    is refused with a sentence while the owner lives; a lock left by a process that ended
    (killed, crashed, the machine restarted) is taken over. The lock is made by linking a
    complete file into place, so two runs starting together cannot both win."""

    def __init__(self, folder: Path, *, node: str):
        self.path = Path(folder) / ".lock"
        self.node = node
        self.held = False
        self.id = uuid.uuid4().hex

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "token": _TOKEN, "id": self.id,
                "started": _start_time(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _stale(self, owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: it cannot be checked from here
        pid = int(owner.get("pid") or 0)
        if pid == os.getpid():  # this process: stale unless a loop of this folder is running now
            return owner.get("token") != _TOKEN or str(self.path.parent.resolve()) not in _RUNNING
        if not process_alive(pid):
            return True
        started = owner.get("started") or ""
        return bool(started) and started != _start_time(pid)

    def acquire(self) -> None:
        tmp = self.path.with_name(f".lock.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        try:
            tmp.write_text(json.dumps(self._mine()))
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                try:
                    owner = json.loads(self.path.read_text())
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                except (OSError, ValueError):
                    owner = {}
                if owner and not self._stale(owner):
                    raise UnconfusedError(
                        f"the run folder {self.path.parent} is in use by another run (process {owner.get('pid')} on "
                        f"{owner.get('host')}, since {owner.get('since')}); wait for it to finish, or choose another "
                        f"run name. If that run is gone, delete {self.path}", node=self.node, input="name")
                if owner.get("pid") != os.getpid():  # (this process's own earlier, finished loop: no news)
                    log.warning("%s: taking over the lock of a run that ended (%s)", self.node,
                                f"process {owner.get('pid')}" if owner else "an unreadable lock")
                self.path.unlink(missing_ok=True)
            raise UnconfusedError(f"could not lock the run folder {self.path.parent}; try again", node=self.node,
                                  input="name")
        except OSError as e:
            raise UnconfusedError(f"cannot lock the run folder {self.path.parent} ({e.strerror or e}); check that "
                                  "it is writable and the disk is not full", node=self.node, input="name") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("id") == self.id:  # never another run's lock
                self.path.unlink()


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
        for key, value, least in (("checkpoint_every", self.checkpoint_every, 0),
                                  ("keep_checkpoints", self.keep_checkpoints, 1)):
            if value < least:
                raise UnconfusedError(f"must be {least} or more (got {value}); checkpoint_every 0 writes only the "
                                      "final checkpoint, keep_checkpoints is how many of the newest stay",
                                      node=self.name, input=key)
        self._limiter = host.RateLimiter(0.25)
        self._lock: RunLock | None = None
        if self.is_main:  # with torchrun the main process owns the folder for all ranks
            self._lock = RunLock(self.run_dir, node=self.name)
            self._lock.acquire()
            weakref.finalize(self, self._lock.release)
            clean_stale_partials(self.run_dir, every=True)  # a killed run's half-written files
            for sub in (p for p in self.run_dir.iterdir() if p.is_dir()):
                clean_stale_partials(sub, every=True)

    def release(self) -> None:
        """Give the run folder free for another run (also on exit and when the loop is dropped)."""
        if self._lock is not None:
            self._lock.release()

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
            self.release()
            before = self._recorded_config().get("base")
            if before and self.config.get("base") and before != self.config.get("base"):
                raise UnconfusedError(f"the run folder {self.run_dir.name} holds checkpoints trained on another base "
                                      f"model ({before}; this one is {self.config['base']}): resuming would mix "
                                      "two models. Load the model it was trained on, choose another run name, or "
                                      "set resume to 'restart' to start over on this model",
                                      node=self.name, input="run_name")
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

    def _recorded_config(self) -> dict:
        try:
            return json.loads((self.run_dir / "run.json").read_text()).get("config", {})
        except (OSError, ValueError, AttributeError):
            return {}

    def clear(self) -> None:
        for p in self.checkpoints():
            p.unlink()

    # -------------------------------------------------------------- the loop
    def run(self, step_fn: Callable[[int], float]) -> list[float]:
        step = self.start_step
        bar = host.progress(self.total_steps, self.name)
        bar.set(step)
        t0, done_here = time.perf_counter(), 0
        _RUNNING.add(str(self.run_dir.resolve()))
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
            self.release()  # this run writes nothing more
            raise
        finally:
            _RUNNING.discard(str(self.run_dir.resolve()))
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
