"""What ComfyUI reads from the pack: mappings, node declarations, imports, packaging."""

import ast
import re
import tomllib
from pathlib import Path

import unconfused

REPO = Path(unconfused.__file__).parent
SOCKET_RE = re.compile(r"^[A-Z_]+$")


def test_exports():
    assert unconfused.WEB_DIRECTORY == "./web"
    assert set(unconfused.NODE_CLASS_MAPPINGS) == set(unconfused.NODE_DISPLAY_NAME_MAPPINGS)
    assert len(unconfused.NODE_CLASS_MAPPINGS) >= 6


def test_node_declarations_are_complete():
    for node_id, cls in unconfused.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Unconfused"), node_id
        assert cls.CATEGORY.startswith("Unconfused/"), (node_id, cls.CATEGORY)
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        for section in ("required", "optional"):
            for name, decl in spec.get(section, {}).items():
                kind = decl[0]
                assert isinstance(kind, list) and kind or SOCKET_RE.match(kind), (node_id, name, kind)
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        assert len(names) == len(cls.RETURN_TYPES), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert "Unconfused" in unconfused.NODE_DISPLAY_NAME_MAPPINGS[node_id]


def _python_files():
    for sub in ("engine", "nodes", "trainers"):
        yield from (REPO / sub).rglob("*.py")
    yield REPO / "__init__.py"


def test_imports_inside_the_pack_are_relative():
    own = {"nodes", "trainers", "engine", "unconfused"}
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in own, f"{path}: absolute import of {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in own, f"{path}: import {alias.name}"


def test_engine_never_imports_comfyui():
    comfy = {"comfy", "folder_paths", "server", "execution", "comfy_extras", "latent_preview"}
    for path in [p for folder in ("engine", "trainers", "app") for p in (REPO / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            for m in mods:
                assert m.split(".")[0] not in comfy, f"{path} imports {m}"


def test_pyproject_for_the_registry():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "comfy" not in meta["project"]["name"].lower()
    assert re.match(r"^\d+\.\d+\.\d+$", meta["project"]["version"])
    assert meta["project"]["version"] == unconfused.__version__
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert key in meta["tool"]["comfy"]
    reqs = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert not any(r.startswith("torch") for r in reqs)  # ComfyUI-Manager must not replace the user's torch
