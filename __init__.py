"""Unconfused: multi-concept personalization without concept confusion, as ComfyUI nodes.

ComfyUI imports this folder as a package from custom_nodes/. Everything inside is imported
relatively: ComfyUI has its own top-level `nodes` module.
"""

from .engine.version import __version__  # noqa: F401  (one place: engine/version.py)


def __getattr__(name: str):
    """The node mappings are imported when ComfyUI asks for them, so `python -m unconfused --help`
    answers without importing torch and the other heavy libraries."""
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
