"""Node names reach error messages from the running-node context (host.running_node), which the
pack's registration sets once for every node - no `node=` argument is passed down the engine."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from unconfused import NODE_CLASS_MAPPINGS
from unconfused.engine.vision import crf as CRF
from unconfused.engine import host
from unconfused.engine.errors import Cancelled, UnconfusedError


def _refine(**bad):
    node = NODE_CLASS_MAPPINGS["UnconfusedCRFRefine"]
    args = dict(images=torch.rand(1, 8, 8, 3), mask_1=torch.rand(1, 8, 8), **bad)
    return getattr(node(), node.FUNCTION)(**args)


def test_an_error_deep_in_the_engine_names_the_running_node():
    # CRFSettings.validate (engine/vision/crf.py) raises without any node argument
    with pytest.raises(UnconfusedError) as e:
        _refine(iterations=0)
    assert str(e.value) == "[UnconfusedCRFRefine] input 'iterations': iterations must be at least 1"
    assert e.value.node == "UnconfusedCRFRefine" and host.current_node_name() is None  # reset after the node


def test_outside_a_node_the_message_names_no_node_or_the_command():
    with pytest.raises(UnconfusedError) as e:
        CRF.CRFSettings(iterations=0).validate()
    assert str(e.value) == "input 'iterations': iterations must be at least 1"
    with pytest.raises(UnconfusedError) as e, host.running_node(name="eval"):  # a CLI job names itself
        CRF.CRFSettings(iterations=0).validate()
    assert str(e.value) == "[eval] input 'iterations': iterations must be at least 1"


def test_an_explicit_name_wins_and_cancel_reads_the_same_everywhere():
    with host.running_node("7", name="UnconfusedSample"):
        assert str(UnconfusedError("x", node="UnconfusedLoadCheckpoint")) == "[UnconfusedLoadCheckpoint] x"
        assert str(UnconfusedError("x")) == "[UnconfusedSample] x"
        assert str(Cancelled()) == "cancelled by the user"
        with host.running_node(None):  # a nested block without a name keeps the node's name
            assert str(UnconfusedError("x")) == "[UnconfusedSample] x"


def test_every_node_declares_unique_id_and_runs_under_it():
    seen = {}
    for key, cls in NODE_CLASS_MAPPINGS.items():
        hidden = cls.INPUT_TYPES().get("hidden") or {}
        assert "UNIQUE_ID" in hidden.values(), key
    node = NODE_CLASS_MAPPINGS["UnconfusedCRFRefine"]  # its own code does not declare UNIQUE_ID
    assert node.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}
    real = CRF.refine_batch

    def spy(*args, **kwargs):
        seen["id"], seen["name"] = host.current_node(), host.current_node_name()
        return real(*args, **kwargs)

    import unconfused.nodes.masks as N

    old = N.CRF.refine_batch
    N.CRF.refine_batch = spy
    try:
        _refine(iterations=1, unique_id="12")  # the wrapper takes unique_id off before the node's function
    finally:
        N.CRF.refine_batch = old
    assert seen == {"id": "12", "name": "UnconfusedCRFRefine"}


def test_is_changed_takes_the_added_unique_id(tmp_path):
    # ComfyUI calls IS_CHANGED with every input, the hidden ones included (a failing IS_CHANGED
    # silently reruns the node every time)
    (tmp_path / "concept_set.json").write_text("{}")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "records.jsonl").write_text("")
    for key, inputs in (("UnconfusedLoadDataset", {"name": str(tmp_path)}),
                        ("UnconfusedLoadConceptSet", {"folder": str(tmp_path)})):
        cls = NODE_CLASS_MAPPINGS[key]
        assert cls.INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}
        assert cls.IS_CHANGED(**inputs, unique_id="3") == cls.IS_CHANGED(**inputs), key


def test_thread_pool_work_keeps_the_node_name():
    def fail():
        raise UnconfusedError("bad", input="x")

    with host.running_node(name="UnconfusedSIDCaptioner"), ThreadPoolExecutor(2) as pool:
        plain = pool.submit(fail).exception()
        named = [f.exception() for f in [pool.submit(host.in_context(fail)) for _ in range(3)]]
    assert str(plain) == "input 'x': bad"  # what a pool loses without host.in_context
    assert all(str(e) == "[UnconfusedSIDCaptioner] input 'x': bad" for e in named)
