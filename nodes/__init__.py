"""ComfyUI nodes: one module per stage, each a thin layer over the engine."""

from . import augment, captions, clif, concepts, em, evaluate, masks, models, sample, lora
from . import handoff  # noqa: E402  (native hand-off with ComfyUI's MODEL/CLIP/VAE)

from .common import guard_inputs  # noqa: E402

_MODULES = [models, concepts, lora, sample, augment, masks, captions, clif, em, evaluate]
_MODULES.append(handoff)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in _MODULES:
    for _key, _cls in _m.NODE_CLASS_MAPPINGS.items():
        guard_inputs(_cls, _key)  # runs as the named node; wrong socket data -> a message naming node and input
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
