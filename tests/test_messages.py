"""The live-feedback message contract (engine/messages.py) that web/unconfused.js relies on:
event names, fields and their types, the graph node id, rate limits, the picture files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tiny_models import tiny_bundle
from unconfused.engine import host, messages
from unconfused.engine.data.concepts import Concept, make_concept_set
from unconfused.trainers.loop import Loop, LoopState
from unconfused.engine.data.synthetic import synthetic_photos

TRAIN_FIELDS = {"node_id", "node", "step", "total", "loss", "lr", "eta_seconds"}
VALIDATION_FIELDS = {"node_id", "node", "step", "prompts", "images"}
MASKS_FIELDS = {"node_id", "node", "step", "labels", "images"}
REF_FIELDS = {"filename", "subfolder", "type"}


@pytest.fixture
def got():
    messages.forget()
    out: list[tuple[str, dict]] = []
    host.add_listener(lambda name, data: out.append((name, data)))
    yield out
    messages.forget()


def of(got, event):
    return [d for name, d in got if name == "unconfused." + event]


def check_refs(refs, n):
    assert len(refs) == n
    for ref in refs:
        assert set(ref) == REF_FIELDS and ref["type"] == "temp" and ref["subfolder"] == messages.SUBFOLDER
        path = host.temp_dir() / ref["subfolder"] / ref["filename"]
        with Image.open(path) as im:
            assert im.format == "PNG" and max(im.size) <= messages.THUMBNAIL


def test_event_names():
    assert messages.EVENTS == ("train", "validation", "masks")
    assert host.EVENT_PREFIX == "unconfused."


def test_running_node_tags_every_message_and_is_reset(got):
    host.send("x", {"a": 1})
    with host.running_node(12):
        assert host.current_node() == "12"
        host.send("x", {"a": 2})
        with host.running_node("5:3"):  # a node inside a group node / subgraph
            host.send("x", {"a": 3})
        host.send("x", {"node_id": "given", "a": 4})
    host.send("x", {"a": 5})
    assert [d.get("node_id") for _, d in got] == [None, "12", "5:3", "given", None]
    assert host.current_node() is None


def test_running_node_is_reset_after_an_error():
    with pytest.raises(RuntimeError):
        with host.running_node("9"):
            raise RuntimeError("boom")
    assert host.current_node() is None


def _loop(tmp_path, steps, lr=1e-3):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    state = LoopState(lambda: {"p": p}, lambda d: p.data.copy_(d["p"]), opt)
    return Loop("UnconfusedTrainLoRA", steps, tmp_path / "run", {"x": 1}, state, checkpoint_every=0)


def test_train_messages_fields_and_types(tmp_path, got):
    with host.running_node("4"):
        _loop(tmp_path, 3).run(lambda step: 1.0 / (step + 1))
    train = of(got, "train")
    assert train, "no train message"
    for d in train:
        assert set(d) == TRAIN_FIELDS
        assert d["node_id"] == "4" and d["node"] == "UnconfusedTrainLoRA" and d["total"] == 3
        assert isinstance(d["step"], int) and isinstance(d["loss"], float) and isinstance(d["lr"], float)
        assert isinstance(d["eta_seconds"], float) and d["eta_seconds"] >= 0
    assert train[0]["step"] == 1 and train[0]["loss"] == 1.0  # the first step goes out at once
    assert train[-1]["step"] == 3 and train[-1]["eta_seconds"] == 0.0 and train[-1]["lr"] == 1e-3


def test_train_messages_are_rate_limited_and_the_last_step_is_sent(tmp_path, got, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(host.time, "monotonic", lambda: clock[0])

    def step(i):  # 62.5 ms per step (exact in binary): 16 steps per second, 4 messages per second
        clock[0] += 0.0625
        return 0.5

    steps = 203
    _loop(tmp_path, steps).run(step)
    sent = [d["step"] for d in of(got, "train")]
    assert sent[0] == 1 and sent[-1] == steps and sent == sorted(sent)
    gaps = [b - a for a, b in zip(sent, sent[1:-1])]
    assert set(gaps) == {4}, sent  # every 0.25 s of training
    assert len(sent) == 1 + (steps - 1) // 4 + 1  # ... and the last step, out of turn
    assert 1 / messages.TRAIN_INTERVAL == 4


def test_validation_message_carries_thumbnails(got):
    big = torch.rand(600, 400, 3)
    with host.running_node("7"):
        messages.send_validation("UnconfusedTrainLoRA", 10, ["<a> on a beach", "<b>"],
                                 [big, Image.new("RGB", (64, 64), (255, 0, 0))])
    (d,) = of(got, "validation")
    assert set(d) == VALIDATION_FIELDS and d["node_id"] == "7" and d["step"] == 10
    assert d["prompts"] == ["<a> on a beach", "<b>"]
    check_refs(d["images"], 2)


def test_masks_message_overlays_rate_limit_and_force(got, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(host.time, "monotonic", lambda: clock[0])
    photo = torch.zeros(1, 32, 48, 3)
    left = torch.zeros(32, 48)
    left[:, :24] = 1
    with host.running_node("9"):
        assert messages.send_masks("UnconfusedTrainEM", 1, [photo], masks=[[left, 1 - left]], labels=["<a> <b>"])
        (first,) = of(got, "masks")
        assert set(first) == MASKS_FIELDS and first["node_id"] == "9" and first["labels"] == ["<a> <b>"]
        check_refs(first["images"], 1)
        with Image.open(host.temp_dir() / messages.SUBFOLDER / first["images"][0]["filename"]) as im:
            a, b = im.convert("RGB").getpixel((2, 16)), im.convert("RGB").getpixel((45, 16))
        assert a != (0, 0, 0) and b != (0, 0, 0) and a != b  # each mask tinted in its own colour

        clock[0] += 0.9
        assert not messages.send_masks("UnconfusedTrainEM", 2, [photo], masks=[[left, 1 - left]])  # < 1 s later
        assert messages.send_masks("UnconfusedTrainEM", 3, [photo], force=True)
        clock[0] += 1.0
        assert messages.send_masks("UnconfusedTrainEM", 4, [photo])
    assert [d["step"] for d in of(got, "masks")] == [1, 3, 4]


def test_old_picture_sets_are_deleted(got):
    folder = host.temp_dir() / messages.SUBFOLDER
    with host.running_node("1"):
        for step in range(5):
            messages.send_validation("N", step, ["p"], [torch.rand(8, 8, 3)])
    assert len(list(folder.glob("validation_*.png"))) == messages.KEEP_SETS
    last = of(got, "validation")[-1]["images"][0]["filename"]
    assert (folder / last).is_file()


def test_no_pictures_are_written_when_nobody_listens():
    messages.forget()
    messages.send_validation("N", 1, ["p"], [torch.rand(8, 8, 3)])
    assert not messages.send_masks("N", 1, [torch.rand(8, 8, 3)], force=True)
    assert not (host.temp_dir() / messages.SUBFOLDER).exists()


def test_lora_node_messages_carry_the_graph_node_id(got):
    from unconfused import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS["UnconfusedTrainLoRA"]
    assert cls.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}
    cs = make_concept_set([Concept("<a>", "dog", synthetic_photos(0, 2, 64))])
    with torch.inference_mode():
        cls().train(tiny_bundle(), cs, name="msg", steps=2, resolution=64, rank=4, alpha=4.0, unet_lr=1e-4,
                    token_lr=2e-4, masked_loss=False, seed=0, resume="restart", export=False,
                    validation_prompts="<a>", validation_steps=2, unique_id="23")
    train, validation = of(got, "train"), of(got, "validation")
    assert [d["step"] for d in train][-1] == 2 and all(d["node_id"] == "23" for d in train)
    (v,) = validation
    assert v["node_id"] == "23" and v["step"] == 2 and v["prompts"] == ["<a>"]
    check_refs(v["images"], 1)
    assert host.current_node() is None
