"""The live-feedback messages the training nodes send to the browser (web/unconfused.js).

The contract - every message is `unconfused.<event>` with a JSON object; `node_id` is the graph
node's id (ComfyUI's hidden input UNIQUE_ID, set by the node with `host.running_node(unique_id)`;
None outside ComfyUI) and `node` the node type or command that runs the trainer:

    unconfused.train       {node_id, node, step, total, loss, lr, eta_seconds}
                           at most 4 per second per trainer (the last step is always sent)
    unconfused.validation  {node_id, node, step, prompts: [str], images: [image ref]}
    unconfused.masks       {node_id, node, step, labels: [str], images: [image ref]}
                           at most 1 per second per node (force=True for the last one)

An image ref is what ComfyUI's own `ui.images` uses, {"filename", "subfolder", "type": "temp"}:
the browser shows it as `/view?filename=...&subfolder=...&type=temp`. Pictures travel as small
PNG files in ComfyUI's temp folder (cleared by ComfyUI at start), not as base64 inside the
message, so the websocket stays light however large the pictures; each node keeps only its last
two sets of files of a kind, so a long run does not fill the temp folder.

Trainers call `send_train`, `send_validation` and `send_masks`; nothing else is needed on the
Python side.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from . import host
from .data.concepts import tensor_to_pil
from .files import atomic_save_image

TRAIN = "train"
VALIDATION = "validation"
MASKS = "masks"
EVENTS = (TRAIN, VALIDATION, MASKS)

TRAIN_INTERVAL = 0.25  # seconds: at most 4 train messages per second
MASKS_INTERVAL = 1.0
THUMBNAIL = 256  # longest side of the pictures sent, in pixels
KEEP_SETS = 2  # sets of files kept per node and kind (the browser may still be fetching the previous)
SUBFOLDER = "unconfused_live"

_lock = threading.Lock()
_files: dict[tuple[str, str], list[list[Any]]] = {}
_mask_limiters: dict[str, host.RateLimiter] = {}


def _as_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, torch.Tensor):
        return tensor_to_pil(img[0] if img.ndim == 4 else img)
    raise TypeError(f"an image must be a PIL image or an IMAGE tensor [H,W,3], not {type(img).__name__}")


def image_refs(images: Sequence[Any], kind: str, node: str | None = None) -> list[dict]:
    """Save pictures (PIL or IMAGE tensors [H,W,3] / [1,H,W,3]) as thumbnails into the temp folder
    and return their view refs; older sets of the same node and kind are deleted (the last
    KEEP_SETS stay)."""
    if not images or not host.has_receivers():
        return []
    folder = host.temp_dir() / SUBFOLDER
    key = (str(node if node is not None else host.current_node()), kind)
    refs, paths = [], []
    for img in images:
        pil = _as_pil(img).convert("RGB")
        pil.thumbnail((THUMBNAIL, THUMBNAIL))
        name = f"{kind}_{uuid.uuid4().hex[:12]}.png"
        atomic_save_image(folder / name, pil, compress_level=1)
        paths.append(folder / name)
        refs.append({"filename": name, "subfolder": SUBFOLDER, "type": "temp"})
    with _lock:
        sets = _files.setdefault(key, [])
        sets.append(paths)
        while len(sets) > KEEP_SETS:
            for old in sets.pop(0):
                old.unlink(missing_ok=True)
    return refs


def send_train(node: str, step: int, total: int, loss: float, lr: float, eta_seconds: float) -> None:
    """One training step (the caller rate-limits: trainers/loop.py sends at most 4 per second)."""
    host.send(TRAIN, {"node_id": host.current_node(), "node": node, "step": int(step), "total": int(total),
                      "loss": float(loss), "lr": float(lr), "eta_seconds": round(float(eta_seconds), 1)})


def send_validation(node: str, step: int, prompts: Sequence[str], images: Sequence[Any] = ()) -> None:
    """Validation pictures of a step, one per prompt."""
    host.send(VALIDATION, {"node_id": host.current_node(), "node": node, "step": int(step),
                           "prompts": [str(p) for p in prompts], "images": image_refs(images, VALIDATION)})


def send_masks(node: str, step: int, images: Sequence[Any], masks: Sequence[Sequence[torch.Tensor]] | None = None,
               labels: Sequence[str] = (), force: bool = False) -> bool:
    """The current masks of the mask-EM node, drawn over the photos.

    images: the photos (PIL or [H,W,3] tensors); masks: optional, for each photo its masks [H,W] in
    0..1 (one per concept, tinted in the preview palette's colours); without masks the images are
    sent as they are (e.g. overlays the caller drew). labels: one line per image (e.g. the tokens).
    Rate-limited to one message per second per node; `force=True` sends regardless (the last step).
    Returns whether it was sent (the pictures are only encoded when it is)."""
    if not host.has_receivers():
        return False
    key = str(host.current_node() if host.current_node() is not None else node)
    with _lock:
        limiter = _mask_limiters.setdefault(key, host.RateLimiter(MASKS_INTERVAL))
    if not limiter.ready(force=force):
        return False
    if masks is not None:
        from .preview import overlay_masks

        pics = []
        for img, ms in zip(images, masks):
            t = img if isinstance(img, torch.Tensor) else torch.from_numpy(
                np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
            pics.append(overlay_masks(t[0] if t.ndim == 4 else t, list(ms)))
        images = pics
    host.send(MASKS, {"node_id": host.current_node(), "node": node, "step": int(step),
                      "labels": [str(x) for x in labels], "images": image_refs(images, MASKS)})
    return True


def forget() -> None:
    """Drop the bookkeeping (tests)."""
    with _lock:
        _files.clear()
        _mask_limiters.clear()
