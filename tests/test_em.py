"""Mask EM: the attention loss pulls a token's map onto its mask; init + alternation + re-estimation on
two real photos composited into one image; exports; exact resume; clear messages."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tiny_models import tiny_bundle
from unconfused.engine import host
from unconfused.engine.vision.attention import AttentionCapture, default_layers, token_position_mask
from unconfused.engine.data.concepts import pil_to_tensor
from unconfused.engine.errors import Cancelled, UnconfusedError
from unconfused.engine.models.concept_tokens import add_concept_tokens
from unconfused.trainers import em as E

RES = 64


@pytest.fixture(scope="module")
def base():
    """One tiny model for the module (building one takes seconds on a busy CPU); trainers clone it."""
    return tiny_bundle()


def composite(dreambooth_dir, size: int = 96):
    """dog2 on the left, cat on the right, each centre-cropped to a half: one image, two concepts,
    and the halves as (coarse) ground truth."""
    halves = []
    for sub in ("dog2", "cat"):
        with Image.open(sorted((dreambooth_dir / sub).glob("*.jpg"))[0]) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
            im = im.resize((size, size), Image.BICUBIC)
            halves.append(pil_to_tensor(im)[:, size // 4: size // 4 + size // 2])
    image = torch.cat(halves, dim=1)  # [size, size, 3]
    left = torch.zeros(size, size)
    left[:, : size // 2] = 1
    return image, [left, 1 - left]


def settings(**kw) -> E.EMSettings:
    base = dict(name="em", steps=6, resolution=RES, tokens_only_steps=3, reestimate_every=2, init_timesteps=4,
                reestimate_timesteps=2, estimate_batch=4, checkpoint_every=3, resume="restart", export=False,
                rank=4, alpha=4.0)
    base.update(kw)
    return E.EMSettings(**base)


def _iou_with(maps: torch.Tensor, target: torch.Tensor) -> float:
    m = AttentionCapture.normalized(maps)[0, 0]
    return E.iou((m > E.otsu_threshold(m)).float(), target)


def test_attention_loss_pulls_the_token_map_onto_its_mask(base):
    """Only the token row trains, only with the attention loss: the token's captured map moves onto
    the target (IoU of its Otsu-thresholded map with the target rises by at least 0.25, to 0.5+; seen:
    0.22 -> 0.62). The random model's attention is nearly uniform (maps within 0.012-0.017), so its
    captured layers' query/key weights are scaled by 4 to give it a trained model's contrast."""
    torch.manual_seed(0)
    b = copy.deepcopy(base)  # its weights change below: not a clone, which shares the frozen weights
    add_concept_tokens(b, [("<a>", "dog")])
    for m in (b.unet, b.text_encoder, b.vae):
        m.requires_grad_(False)
    with torch.no_grad():
        for name in default_layers(b.unet):
            attn = b.unet.get_submodule(name)
            attn.to_q.weight.mul_(4.0)
            attn.to_k.weight.mul_(4.0)
    emb = b.text_encoder.get_input_embeddings()
    emb.new_rows.requires_grad_(True)
    opt = torch.optim.Adam([emb.new_rows], lr=5e-2)
    prompt = ["a photo of <a>"]
    pos = token_position_mask(b, prompt, ["<a>"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 300, 500, 700])
    target = torch.zeros(8, 8)
    target[:, :3] = 1  # a left band the untrained token does not attend to
    ious = []
    with AttentionCapture(b.unet, default_layers(b.unet), detach=False) as cap:
        for step in range(26):
            cap.reset()
            cap.watch(pos.expand(4, -1, -1))
            cond = b.text_encoder(b.tokenize(prompt))[0].expand(4, -1, -1)
            b.unet(x, t, cond)
            maps = cap.maps()  # [4, 1, 8, 8]
            ious.append(_iou_with(maps.mean(0, keepdim=True).detach(), target))
            if step == 25:
                break
            loss = E.attention_loss(maps, target.expand(4, 1, 8, 8))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert ious[-1] >= ious[0] + 0.25, ious
    assert ious[-1] >= 0.5, ious


def test_concept_lines_and_their_messages():
    per = E.parse_concept_lines("<dog> dog\n2: <cat> tabby cat\n# comment\n1,2: <room> living room", 2)
    assert per == [[("<dog>", "dog"), ("<room>", "living room")],
                   [("<dog>", "dog"), ("<cat>", "tabby cat"), ("<room>", "living room")]]
    for text, msg in [("", "no concepts"), ("dog dog", "angle brackets"), ("<a> dog\n<a> cat", "listed twice"),
                      ("3: <a> dog", "there are 2 image"), ("1: <a> dog", "image 2 has no concept"),
                      ("<a>", "cannot read")]:
        with pytest.raises(UnconfusedError, match=rf"\[UnconfusedTrainMaskEM\] input 'concepts'.*{msg}"), \
                host.running_node(name="UnconfusedTrainMaskEM"):  # as the node runs it
            E.parse_concept_lines(text, 2)
    img = torch.zeros(8, 8, 3)
    with pytest.raises(UnconfusedError, match="input 'ground_truth'.*1 ground-truth masks.*2 concepts"):
        E.make_scenes([img], "<a> dog\n<b> cat", [torch.zeros(8, 8)])
    with pytest.raises(UnconfusedError, match="input 'threshold_mode'"):
        E.EMSettings(threshold_mode="mean").validated()
    with pytest.raises(UnconfusedError, match="input 'inversion_steps'.*shorter"):
        E.EMSettings(steps=5, inversion_steps=5).validated()


def test_threshold_and_binarize():
    m = torch.cat([torch.full((4, 8), 0.1), torch.full((4, 8), 0.9)])
    assert 0.1 < E.otsu_threshold(m) <= 0.9
    maps = torch.stack([m, m.flip(0) * 0.95])
    bins = E.binarize(maps, "otsu")
    assert torch.equal(bins[0], (m > 0.5).float()) and torch.equal(bins[1], (m.flip(0) > 0.5).float())
    assert float((bins.sum(0) > 1).sum()) == 0  # a pixel belongs to one concept at most
    square = torch.zeros(16, 16)
    square[4:12, 4:12] = 1
    back = E.unfit_square(square, 16, 32)  # a 2:1 image was centre-cropped to its middle square
    assert back.shape == (16, 32) and back[:, :8].max() == 0 and back[6, 16] == 1


def test_fixed_mask_stage_ends_the_re_estimation(dreambooth_dir, base):
    """The paper's final stage: phase 2 (tokens + LoRA) trains on the last masks of phase 1, no round in it."""
    image, gt = composite(dreambooth_dir)
    scenes = E.make_scenes([image], "<dog> dog\n<cat> cat", gt)
    fixed = settings(name="fx", steps=9, tokens_only_steps=5, fixed_mask_stage=True)
    assert E.EMTrainer(base, scenes, fixed).round_steps() == [0, 2, 4, 5]
    assert E.EMTrainer(base, scenes, settings(name="fx", steps=9, tokens_only_steps=5)).round_steps() == \
        [0, 2, 4, 6, 8, 9]


def test_gradient_checkpointing_trains_the_em_exactly_as_without(dreambooth_dir, base):
    """With gradient checkpointing each UNet block runs again during backward, after the batch's
    attention watch has ended; the capture must record the same maps then (before, torch refused:
    'A different number of tensors was saved during the original forward and recomputation')."""
    image, gt = composite(dreambooth_dir)
    scenes = E.make_scenes([image], "<dog> dog\n<cat> cat", gt)
    out = {}
    for gc in (False, True):
        tr = E.EMTrainer(base, scenes, settings(name=f"gc{int(gc)}", steps=5, tokens_only_steps=2, crf_at="off",
                                                gradient_checkpointing=gc))
        res = tr.run()
        out[gc] = (res.losses, {k: v.detach().clone() for k, v in tr.trainable.items()})
    assert tr.settings.attention_weight > 0 and len(out[True][0]) == 5
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v, rtol=1e-5, atol=1e-6)


def test_em_end_to_end_on_two_photos_in_one_image(dreambooth_dir, base):
    image, gt = composite(dreambooth_dir)
    scenes = E.make_scenes([image], "<dog> dog\n<cat> cat", gt)
    s = settings(name="pair", export=True, inversion_steps=1, steps=7, validation_prompts=["<dog> and <cat>"],
                 validation_steps=2)
    tr = E.EMTrainer(base, scenes, s)
    assert tr.round_steps() == [1, 3, 5, 7]
    assert [tr.phase(i) for i in range(7)] == ["inversion", "tokens", "tokens", "tokens", "tokens+lora",
                                               "tokens+lora", "tokens+lora"]
    lora0 = {n: p.detach().clone() for n, p in tr.trainable.items() if n.startswith("unet.")}
    seen = {}
    real_step = E.LoraTrainer.step

    def spy(self, step):
        seen[step] = {n: p.detach().clone() for n, p in self.trainable.items() if n.startswith("unet.")}
        return real_step(self, step)

    E.LoraTrainer.step = spy
    try:
        res = tr.run()
    finally:
        E.LoraTrainer.step = real_step
    # LoRA frozen through the warm-up and phase 1, trained in phase 2
    assert all(torch.equal(seen[4][n], lora0[n]) for n in lora0)
    assert any(not torch.equal(res.bundle.unet.get_parameter(n[len("unet."):]).cpu(), lora0[n]) for n in lora0)
    assert [r.step for r in res.rounds] == [1, 3, 5, 7]
    for r in res.rounds:
        assert r.masks.shape == (1, 2, RES // 8, RES // 8)
        assert set(r.iou) == {"<dog>", "<cat>"} and all(0 <= v <= 1 for v in r.iou.values())
        assert float((r.masks.sum(1) > 1.5).sum()) == 0  # labels compete: no pixel in two masks
    assert len(res.masks) == 1 and res.masks[0].shape == (2, 96, 96)
    assert res.mask_batch().shape == (2, 96, 96) and res.labels == ["image 1: <dog>", "image 1: <cat>"]
    assert res.history.size == (160, 4 * (160 + 2 * 12 + 6))  # one row per round
    assert res.iou_curve is not None and (res.run_dir / "iou.png").is_file()
    assert len(list((res.run_dir / "masks").glob("round_*/*.png"))) == 8
    lora = load_file(res.exports["lora"])
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert set(load_file(res.exports["embedding:<dog>"])) == {"clip_l"}
    assert res.exports["embedding:<cat>"].name == "pair_cat.safetensors"
    assert "mask rounds: 4" in res.info() and "IoU with the ground truth" in res.info()
    assert res.validation is not None


def test_resume_equals_uninterrupted_run(dreambooth_dir, base):
    image, _ = composite(dreambooth_dir, 64)
    scenes = E.make_scenes([image], "<dog> dog\n<cat> cat")
    full = E.EMTrainer(base, scenes, settings(name="full", checkpoint_every=100))
    want = full.run()

    cut = E.EMTrainer(base, scenes, settings(name="cut", checkpoint_every=100))
    cut.loop.on_step = lambda step, loss: host.request_cancel() if step == 4 else None
    with pytest.raises(Cancelled):
        cut.run()
    host.clear_cancel()
    assert [p.name for p in cut.loop.checkpoints()] == ["step_000004.pt"]
    again = E.EMTrainer(base, scenes, settings(name="cut", checkpoint_every=100, resume="auto"))
    got = again.run()
    assert got.resumed_from == 4
    for k, v in full.trainable.items():
        assert torch.allclose(again.trainable[k], v, atol=1e-6), k
    assert [r.step for r in got.rounds] == [r.step for r in want.rounds] == [0, 2, 4, 6]
    for a, b in zip(got.rounds, want.rounds):
        assert torch.equal(a.masks, b.masks)
    assert got.losses == pytest.approx(want.losses, rel=1e-5)
    # a finished run returns at once with its rounds
    done = E.EMTrainer(base, scenes, settings(name="cut", checkpoint_every=100, resume="auto")).run()
    assert done.resumed_from == 6 and len(done.rounds) == 4


def test_node_runs_under_comfyui_inference_mode(dreambooth_dir):
    from unconfused.nodes.em import NODE_CLASS_MAPPINGS

    image, gt = composite(dreambooth_dir, 64)
    node = NODE_CLASS_MAPPINGS["UnconfusedTrainMaskEM"]()
    with torch.inference_mode():
        bundle = tiny_bundle()
        out = node.train(bundle, image[None], "<dog> dog\n<cat> cat", name="node", steps=4, resolution=RES,
                         tokens_only_steps=2, reestimate_every=2, init_timesteps=2, reestimate_timesteps=2,
                         attention_weight=0.01, threshold_mode="otsu", threshold=0.45, crf_at="latent", rank=4,
                         alpha=4.0, unet_lr=1e-4, token_lr=5e-4, seed=0, resume="restart",
                         ground_truth=torch.stack(gt))
    model, masks, history, curve, info = out["result"]
    assert model.added_tokens.keys() == {"<dog>", "<cat>"}
    assert masks.shape == (2, 64, 64) and history.ndim == 4 and curve.ndim == 4
    assert "embedding:node_dog" in info and (host.model_folders("loras")[0] / "node.safetensors").is_file()
    assert len(out["ui"]["images"]) == 2


def test_cli_em_job(dreambooth_dir, tmp_path, capsys):
    import json

    from unconfused.app.cli import main

    image, gt = composite(dreambooth_dir, 64)
    from unconfused.engine.data.concepts import tensor_to_pil

    tensor_to_pil(image).save(tmp_path / "pair.png")
    for name, m in zip(("dog", "cat"), gt):
        tensor_to_pil(m).save(tmp_path / f"gt_{name}.png")
    job = {"images": ["pair.png"], "concepts": ["<dog> dog", "<cat> cat"], "ground_truth": ["gt_dog.png", "gt_cat.png"],
           "settings": {"name": "cli", "steps": 2, "resolution": RES, "tokens_only_steps": 1, "reestimate_every": 0,
                        "init_timesteps": 2, "export": False}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["em", "--config", str(tmp_path / "job.json"), "--set", "rank=4"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["steps"] == 2 and [r["step"] for r in report["rounds"]] == [0, 2]
    assert sorted(p.name for p in Path(report["masks"]).iterdir()) == ["image1_cat.png", "image1_dog.png"]
    (tmp_path / "bad.json").write_text(json.dumps({"images": ["pair.png"], "concepts": ["dog dog"]}))
    assert main(["em", "--config", str(tmp_path / "bad.json")]) == 2
    assert "angle brackets" in capsys.readouterr().err


def test_cancel_during_a_mask_estimate_stops_at_the_next_timestep_batch(base):
    """A round of 8 timesteps in batches of 2 is 4 UNet calls; Cancel asked during the 2nd stops it
    before the 3rd (host.check_cancel per timestep batch), not after the whole round."""
    img = torch.rand(64, 64, 3)
    tr = E.EMTrainer(base, E.make_scenes([img], "<a> dog\n<b> cat"),
                     settings(name="cancel-estimate", estimate_batch=2, crf_at="off"))
    calls = []
    real = tr.call_unet

    def counting(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            host.request_cancel()
        return real(*a, **k)

    tr.call_unet = counting
    with host.training_mode(), pytest.raises(Cancelled):
        tr.estimate(0, 8)
    host.clear_cancel()
    assert len(calls) == 2
