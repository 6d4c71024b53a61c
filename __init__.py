"""Unconfused: multi-concept personalization without concept confusion, as ComfyUI nodes.

ComfyUI imports this folder as a package from custom_nodes/. Everything inside is imported
relatively: ComfyUI has its own top-level `nodes` module.
"""

from .engine.version import __version__  # noqa: F401  (one place: engine/version.py)
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
