"""What every node module shares: socket type names, preview saving, error pass-through.

Nodes only translate between ComfyUI types and the engine; nothing here computes.
"""

from __future__ import annotations

import uuid

import torch

from ..engine import host
from ..engine.data.concepts import tensor_to_pil
from ..engine.errors import UnconfusedError
from ..engine.files import atomic_save_image

# Custom socket types (strings ComfyUI matches between outputs and inputs).
MODEL_BUNDLE = "UNCONFUSED_MODEL"
CONCEPT = "UNCONFUSED_CONCEPT"
CONCEPT_SET = "UNCONFUSED_CONCEPT_SET"
REGIONS = "UNCONFUSED_REGIONS"
DATASET = "UNCONFUSED_DATASET"
SAM_MODEL = "UNCONFUSED_SAM"
CLIP_MODEL = "UNCONFUSED_CLIP"
DINO_MODEL = "UNCONFUSED_DINO"

CATEGORY = "Unconfused"


def int_input(default, lo, hi, tip, step=1):
    """An INT widget (nodes without a settings dataclass; the trainers' come from engine/settings.py)."""
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


def float_input(default, lo, hi, step, tip):
    """A FLOAT widget, shown unrounded (learning rates, thresholds)."""
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


def save_previews(images, prefix: str = "unconfused") -> list[dict]:
    """Save images (PIL, or IMAGE tensors [H,W,3]/[B,H,W,3]) into ComfyUI's temp folder and
    return the `ui.images` entries that make ComfyUI show them on the node."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    out = []
    folder = host.temp_dir()
    for img in images:
        pil = tensor_to_pil(img) if isinstance(img, torch.Tensor) else img
        name = f"{prefix}_{uuid.uuid4().hex[:10]}.png"
        atomic_save_image(folder / name, pil, compress_level=1)
        out.append({"filename": name, "subfolder": "", "type": "temp"})
    return out


def with_preview(result: tuple, images, prefix: str = "unconfused") -> dict:
    """A node return value carrying both outputs and preview images."""
    return {"ui": {"images": save_previews(images, prefix)}, "result": result}


# ---------------------------------------------------------------- socket data checks
def _socket_checks() -> dict:
    """Socket type -> (what it should be, test). Engine types are imported lazily."""
    def is_(module: str, name: str):
        def test(v):
            import importlib

            cls = getattr(importlib.import_module(f"..engine.{module}", __package__), name)
            return isinstance(v, cls)
        return test

    return {
        MODEL_BUNDLE: ("a model from Load Checkpoint (Unconfused) or a trainer", is_("models.loading", "ModelBundle")),
        CONCEPT: ("a concept from Concept (Unconfused)", is_("data.concepts", "Concept")),
        CONCEPT_SET: ("a concept set from Concept Set (Unconfused)", is_("data.concepts", "ConceptSet")),
        DATASET: ("a dataset from the augmentation builder or Load Dataset (Unconfused)", is_("data.augmented_dataset", "Dataset")),
        SAM_MODEL: ("a SAM model from Load SAM (Unconfused)", is_("vision.sam", "SamModel")),
        REGIONS: ("regions from the SAM segment node", is_("vision.sam", "Regions")),
        CLIP_MODEL: ("a CLIP model from Load CLIP (Unconfused)", is_("vision.clip_zero_shot", "ClipScorer")),
        DINO_MODEL: ("a DINO model from Load DINO (Unconfused)", is_("vision.dino", "DinoModel")),
        "IMAGE": ("an IMAGE batch [batch, height, width, 3]",
                  lambda v: isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[-1] in (3, 4)),
        "MASK": ("a MASK [batch, height, width]", lambda v: isinstance(v, torch.Tensor) and v.ndim in (2, 3)),
        "LATENT": ("a LATENT", lambda v: isinstance(v, dict) and "samples" in v),
    }


def _input_types(cls) -> dict[str, str]:
    spec = cls.INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, decl in spec.get(group, {}).items():
            if isinstance(decl, tuple) and decl and isinstance(decl[0], str):
                out[name] = decl[0]
    return out


def _unique_id_input(cls) -> str | None:
    """The name under which the node declares ComfyUI's hidden UNIQUE_ID itself, if it does."""
    hidden = cls.INPUT_TYPES().get("hidden") or {}
    return next((name for name, kind in hidden.items() if kind == "UNIQUE_ID"), None)


def guard_inputs(cls, node_id: str | None = None):
    """Wrap a node's function so that (1) it runs inside `host.running_node` with the node's id
    and its graph node's UNIQUE_ID: every UnconfusedError raised below names the node and every
    message to the browser finds it, without the node passing its name down; and (2) data of the
    wrong kind on a socket (a hand-edited or old workflow, a custom node sending something else)
    is named, with the input and what belongs there - instead of an AttributeError deep in the
    engine. Empty IMAGE and MASK batches are refused the same way.

    A node that does not declare the hidden UNIQUE_ID gets it declared (V1 API: old and new
    ComfyUI pass declared hidden inputs as keyword arguments); the wrapper takes it off again
    before calling the node's function. A node that declares it keeps receiving it."""
    import functools

    fn_name = cls.FUNCTION
    fn = getattr(cls, fn_name)
    if getattr(fn, "_unconfused_guarded", False):
        return cls
    node_id = getattr(cls, "NODE_ID", None) or node_id or cls.__name__  # the node's own name wins
    declared = _unique_id_input(cls)
    uid_name = declared or "unique_id"
    if declared is None:
        input_types = cls.INPUT_TYPES  # bound to cls

        def with_unique_id(klass):
            spec = dict(input_types())
            spec["hidden"] = {**(spec.get("hidden") or {}), uid_name: "UNIQUE_ID"}
            return spec

        cls.INPUT_TYPES = classmethod(with_unique_id)
        if hasattr(cls, "IS_CHANGED"):  # ComfyUI passes it every input, hidden ones included
            is_changed = cls.IS_CHANGED  # bound to cls

            def is_changed_without_id(klass, *args, **kwargs):
                kwargs.pop(uid_name, None)
                return is_changed(*args, **kwargs)

            cls.IS_CHANGED = classmethod(is_changed_without_id)

    @functools.wraps(fn)
    def checked(self, *args, **kwargs):
        unique_id = kwargs.get(uid_name) if declared else kwargs.pop(uid_name, None)
        with host.running_node(unique_id, name=node_id):
            checks = _socket_checks()
            for name, value in kwargs.items():
                kind = _input_types(cls).get(name)
                if value is None or kind not in checks:
                    continue
                what, ok = checks[kind]
                if not ok(value):
                    got = type(value).__name__ + (f" of shape {list(value.shape)}" if hasattr(value, "shape") else "")
                    raise UnconfusedError(f"expected {what}, got {got}; connect the right output to it", input=name)
                if kind in ("IMAGE", "MASK") and value.ndim >= 3 and value.shape[0] == 0:
                    raise UnconfusedError(f"the {kind} batch is empty; connect one with at least one picture",
                                          input=name)
            return fn(self, *args, **kwargs)

    checked._unconfused_guarded = True
    setattr(cls, fn_name, checked)
    return cls
