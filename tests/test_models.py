"""The checkpoint loader: families, damaged files, safe unpickling, diffusers folders, the node."""

from unconfused.engine import host
import pickle

import pytest
import torch
from safetensors.torch import save_file

from unconfused.engine.models.demo import write_demo_diffusers_folder
from unconfused.engine.errors import UnconfusedError
from unconfused.engine.models.loading import detect_family, detect_prediction, load_model, read_state_dict
from unconfused.nodes.models import UnconfusedLoadCheckpoint

U = "model.diffusion_model."


def sd_like(context_dim=768, in_ch=4, vae=True, text=True):
    sd = {U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, context_dim),
          U + "input_blocks.0.0.weight": torch.zeros(320, in_ch, 3, 3)}
    if vae:
        sd["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 128, 3, 3)
    if text:
        sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(768)
    return sd


@pytest.mark.parametrize("sd,needle", [
    ({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1), U + "label_emb.0.0.weight": torch.zeros(1)},
     "SDXL"),
    ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "Flux"),
    ({U + "joint_blocks.0.x": torch.zeros(1)}, "SD3"),
    ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "only a UNet"),
    ({"foo": torch.zeros(1)}, "not a Stable Diffusion checkpoint"),
    (sd_like(context_dim=2048), "neither SD 1.x"),
    (sd_like(in_ch=9), "inpainting"),
    (sd_like(vae=False), "no the VAE"),
    (sd_like(text=False), "no the text encoder"),
])
def test_other_families_and_parts_are_named(sd, needle):
    with pytest.raises(UnconfusedError) as e:
        with host.running_node(name="UnconfusedLoadCheckpoint"):
            detect_family(sd, "model.safetensors")
    msg = str(e.value)
    assert needle.replace("no the ", "no ") in msg.replace("no the ", "no ") and "model.safetensors" in msg
    assert "[UnconfusedLoadCheckpoint] input 'ckpt_name'" in msg


def test_family_and_prediction_detection():
    assert detect_family(sd_like(768), "a") == "sd1"
    assert detect_family(sd_like(1024), "a") == "sd2"
    key = U + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    assert detect_prediction({key: torch.zeros(320)}, "sd2") == "epsilon"
    assert detect_prediction({key: torch.randn(320)}, "sd2") == "v_prediction"
    assert detect_prediction({key: torch.randn(320)}, "sd1") == "epsilon"  # the spread test is SD2's only
    assert detect_prediction({"v_pred": torch.tensor([])}, "sd1") == "v_prediction"


def test_truncated_safetensors_is_reported(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UnconfusedError, match="damaged or truncated"):
        read_state_dict(path)


def test_truncated_ckpt_is_reported(tmp_path):
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": {"a": torch.randn(64, 64)}}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UnconfusedError, match="damaged or truncated"):
        read_state_dict(path)


class Payload:
    """Unpickling this would run code; the loader must refuse, not execute."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_ckpt_with_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": Payload()}, str(path), pickle_module=pickle)
    with pytest.raises(UnconfusedError, match="refused"):
        read_state_dict(path)
    assert not (tmp_path / "PWNED").exists()


def test_plain_ckpt_state_dict_is_read(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 5}, str(path))
    assert torch.equal(read_state_dict(path)["a"], torch.ones(2))


def test_node_without_any_checkpoint_says_where_to_put_one(tmp_path):
    choices = UnconfusedLoadCheckpoint.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert len(choices) == 1 and "models/checkpoints" in choices[0]
    with pytest.raises(UnconfusedError) as e:
        UnconfusedLoadCheckpoint().load(choices[0], "auto", "auto")
    assert str(tmp_path / "models" / "checkpoints") in str(e.value) and "ckpt_name" in str(e.value)


def test_node_loads_a_diffusers_folder(tmp_path):
    write_demo_diffusers_folder(tmp_path / "models" / "diffusers" / "demo")
    choices = UnconfusedLoadCheckpoint.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices == ["diffusers/demo"]
    out = UnconfusedLoadCheckpoint().load("diffusers/demo", "auto", "fp32")
    bundle, info = out["result"]
    assert bundle.family == "sd1" and bundle.prediction_type == "epsilon" and "demo" in info
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    ids = bundle.tokenize(["a photo of <my-dog> dog"])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406
    with torch.no_grad():
        cond = bundle.encode_prompt(["a photo of a dog", "a cat"])
    assert cond.shape == (2, 77, bundle.text_encoder.config.hidden_size)
    out = UnconfusedLoadCheckpoint().load("diffusers/demo", "v_prediction", "fp32")
    assert out["result"][0].prediction_type == "v_prediction"


def test_garbage_file_with_checkpoint_suffix(tmp_path):
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "notes.safetensors").write_text("this is not a model")
    with pytest.raises(UnconfusedError, match="notes.safetensors is damaged"):
        UnconfusedLoadCheckpoint().load("notes.safetensors", "auto", "auto")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnconfusedError, match="unknown file type"):
        load_model(tmp_path / "x.gguf")
