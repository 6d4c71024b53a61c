"""Re-save the example workflows after a node gained inputs: append the default of every widget a saved
example lacks (inputs are added at the end of a node's optional inputs), in its UI form (examples/) and its
API form (tests/workflows/) alike, keeping each file's indentation. Run: .venv/bin/python scripts/update_examples.py"""
import json
import sys
from pathlib import Path

REPO = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from comfy_harness import SEED_CONTROL, WIDGET_TYPES  # noqa: E402

from unconfused import nodes  # noqa: E402

def widgets(nid):
    spec = nodes.NODE_CLASS_MAPPINGS[nid].INPUT_TYPES()
    out = []
    for sect in ("required", "optional"):
        for k, d in spec.get(sect, {}).items():
            if isinstance(d[0], list) or d[0] in WIDGET_TYPES:
                out.append((k, d[1].get("default") if len(d) > 1 and isinstance(d[1], dict) else None,
                            d[0] if isinstance(d[0], list) else None))
        if sect == "required":
            image = spec.get("required", {}).get("image")
            if image and len(image) > 1 and isinstance(image[1], dict) and image[1].get("image_upload"):
                out.append(("upload", "image", None))
    return out

changed = []
for ui_path in sorted((REPO / "examples").glob("*.json")):
    ui = json.loads(ui_path.read_text())
    api_path = REPO / "tests" / "workflows" / f"{ui_path.stem}_api.json"
    api = json.loads(api_path.read_text()) if api_path.exists() else None
    dirty = False
    for n in ui["nodes"]:
        if n["type"] not in nodes.NODE_CLASS_MAPPINGS:
            continue
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        values = list(n.get("widgets_values") or [])
        missing = []
        for name, default, choices in widgets(n["type"]):
            if name in linked:
                continue  # (a widget converted to an input keeps no value)
            if values:
                values.pop(0)
                if name in ("seed", "noise_seed") and values and values[0] in SEED_CONTROL:
                    values.pop(0)
            else:
                if default is None and choices:
                    default = choices[0]
                missing.append((name, default))
        if missing:
            n["widgets_values"] = list(n.get("widgets_values") or []) + [d for _, d in missing]
            if api is not None and str(n["id"]) in api:
                api[str(n["id"])]["inputs"].update({k: d for k, d in missing})
            dirty = True
            changed.append((ui_path.name, n["type"], [k for k, _ in missing]))
    def dump(path, obj):
        text = path.read_text()
        indent = len(text.split("\n")[1]) - len(text.split("\n")[1].lstrip())
        path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + ("\n" if text.endswith("\n") else ""))
    if dirty:
        dump(ui_path, ui)
        if api is not None:
            dump(api_path, api)
for c in changed:
    print(c)
