"""The host adapter's standalone behaviour (ComfyUI's side is exercised in the real-ComfyUI tests)."""

import os

import pytest
import torch

from unconfused.engine import host
from unconfused.engine.errors import Cancelled, UnconfusedError
from unconfused.engine.files import atomic_path, atomic_write_text, inside, safe_name


def test_progress_raises_cancelled_after_request():
    bar = host.progress(10, "x")
    bar.update()
    host.request_cancel()
    with pytest.raises(Cancelled):
        bar.update()
    bar.update()  # the request is consumed: a later job is not cancelled too
    assert bar.value == 2


def test_training_mode_allows_backward_inside_inference_mode():
    w = torch.nn.Linear(3, 1)
    with torch.inference_mode():
        x = torch.randn(4, 3)  # an inference tensor, as ComfyUI hands them to nodes
        with pytest.raises(RuntimeError):
            w(x).sum().backward()
        with host.training_mode():
            loss = w(host.detach_clone(x)).sum()
            loss.backward()
    assert w.weight.grad is not None and torch.isfinite(w.weight.grad).all()


def test_device_choice():
    assert host.device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert host.device("auto") == torch.device("cpu")
        with pytest.raises(UnconfusedError, match="CUDA"):
            host.device("cuda")
    with pytest.raises(UnconfusedError, match="unknown device"):
        host.device("tpu")
    assert host.default_dtype(torch.device("cpu")) == torch.float32
    assert host.default_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_find_model_says_which_file_goes_where(tmp_path):
    with pytest.raises(UnconfusedError) as e:
        with host.running_node(name="N"):
            host.find_model("checkpoints", "", input="ckpt_name", what="SD checkpoint")
    assert "[N] input 'ckpt_name'" in str(e.value) and str(tmp_path / "models" / "checkpoints") in str(e.value)
    (tmp_path / "models" / "sams").mkdir(parents=True)
    (tmp_path / "models" / "sams" / "sam_vit_b.pth").write_bytes(b"x")
    assert host.list_models("sams") == ["sam_vit_b.pth"]
    assert host.find_model("sams", "sam_vit_b.pth") == tmp_path / "models" / "sams" / "sam_vit_b.pth"
    with pytest.raises(UnconfusedError, match="not a file name"):
        host.find_model("sams", "../../etc/passwd")


def test_messages_reach_listeners_and_rate_limit():
    got = []
    host.add_listener(lambda name, data: got.append((name, data)))
    host.send("progress", {"step": 1})
    assert got == [("unconfused.progress", {"step": 1})]
    rl = host.RateLimiter(interval=60)
    assert rl.ready() and not rl.ready() and rl.ready(force=True)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "file.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_disk_full_gives_a_sentence_and_no_partial_file(tmp_path, monkeypatch):
    import errno

    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and ".partial" in str(path):
            def write(_data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = write
        return f

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(UnconfusedError, match="disk is not full"):
        atomic_write_text(tmp_path / "out" / "x.txt", "x")
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []


def test_output_names_cannot_escape(tmp_path):
    name = safe_name("../../evil")
    assert "/" not in name and not name.startswith(".") and name.endswith("evil")
    assert "/" not in safe_name("a/b")
    with pytest.raises(UnconfusedError):
        safe_name("..")
    with pytest.raises(UnconfusedError, match="outside"):
        inside(tmp_path, "../x")
    assert inside(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()
