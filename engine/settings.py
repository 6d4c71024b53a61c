"""Settings declared once: a trainer's settings are a dataclass whose fields carry their own
default, range, choices and tooltip. From that one declaration come the node's inputs
(`node_inputs`), the checks every run makes (`check_declared`), the command line's typed
`--set` (the field's type) and the docs' tables (docs/nodes.md is generated from the inputs).

    steps: int = setting(800, min=1, ui_max=100000, tip="Optimizer steps")

`min`/`max` are the setting's real bounds (a job file past them is refused); `ui_max` is only
the widget's upper end (a job file may go further: e.g. steps). A subclass that means a field
differently (the mask EM's `steps`) declares it again with its own default and tooltip.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field

from .errors import UnconfusedError

_KEY = "unconfused"


def setting(default, *, tip: str = "", min=None, max=None, ui_max=None, step=None, choices=None,
            multiline: bool = False, lines: bool = False):
    """A dataclass field with its declaration. `lines`: a list of strings that a node takes as one
    multi-line text (one item per line)."""
    meta = {_KEY: dict(tip=tip, min=min, max=max, ui_max=ui_max, step=step, choices=choices,
                       multiline=multiline or lines, lines=lines)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def declaration(cls, name: str) -> dict:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(_KEY, {})
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def node_input(cls, name: str) -> tuple:
    """The ComfyUI input of one setting (V1 node API: (type or choices, options))."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    d = f.metadata.get(_KEY, {})
    tp = typing.get_type_hints(cls)[name]
    default = _default(f)
    tip = {"tooltip": d["tip"]} if d.get("tip") else {}
    if d.get("choices") is not None:
        return list(d["choices"]), {"default": default, **tip}
    if tp is bool:
        return "BOOLEAN", {"default": default, **tip}
    if tp in (int, float):
        opts = {"default": default, "min": d.get("min"), "max": d.get("max", None) if d.get("max") is not None
                else d.get("ui_max"), "step": d.get("step") or (1 if tp is int else 0.01)}
        if tp is float:
            opts["round"] = False
        return ("INT" if tp is int else "FLOAT"), {**opts, **tip}
    if d.get("lines"):
        return "STRING", {"multiline": True, "dynamicPrompts": False, "default": "\n".join(default), **tip}
    opts = {"default": default}
    if d.get("multiline"):
        opts.update(multiline=True, dynamicPrompts=False)  # the frontend's wildcards would eat {}
    return "STRING", {**opts, **tip}


def node_inputs(cls, names: list[str]) -> dict[str, tuple]:
    """The inputs of a node that exposes these settings, in this order."""
    return {n: node_input(cls, n) for n in names}


def check_declared(settings) -> None:
    """Every declared bound and choice, with a sentence that names the input and what fits."""
    for f in dataclasses.fields(settings):
        d = f.metadata.get(_KEY)
        if not d:
            continue
        value = getattr(settings, f.name)
        if d["choices"] is not None and value not in d["choices"]:
            raise UnconfusedError(f"'{value}' is not one of {list(d['choices'])}", input=f.name)
        lo, hi = d["min"], d["max"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                span = (f"between {lo} and {hi}" if lo is not None and hi is not None else
                        f"at least {lo}" if lo is not None else f"at most {hi}")
                raise UnconfusedError(f"must be {span}, got {value}" + (f" ({d['tip']})" if d["tip"] else ""), input=f.name)


def reference_rows(cls) -> list[dict]:
    """One row per setting (name, type, default, bounds or choices, tooltip), for docs and --help."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        d = f.metadata.get(_KEY, {})
        rows.append(dict(name=f.name, type=getattr(hints[f.name], "__name__", str(hints[f.name])), default=_default(f),
                         min=d.get("min"), max=d.get("max"), choices=d.get("choices"), tip=d.get("tip", "")))
    return rows
