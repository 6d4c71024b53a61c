"""Unconfused: multi-concept personalization without concept confusion, as ComfyUI nodes.

ComfyUI imports this folder as a package from custom_nodes/. Everything inside is imported
relatively: ComfyUI has its own top-level `nodes` module.

The node mappings load on first access (PEP 562), so `import unconfused.engine...` from the
command line, the tests or a notebook does not import the ComfyUI face (tests/test_layers.py).
"""

from .engine.version import __version__  # noqa: F401  (one place: engine/version.py)

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def __getattr__(name: str):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
