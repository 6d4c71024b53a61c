"""The hardening matrix: every node, every socket input, data of the wrong kind or an empty
batch -> a message naming the node, the input and what belongs there."""

from __future__ import annotations

import pytest
import torch

from unconfused import NODE_CLASS_MAPPINGS
from unconfused.engine.errors import UnconfusedError
from unconfused.nodes.common import _input_types, _socket_checks


def socket_cases():
    checks = _socket_checks()
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        for name, kind in _input_types(cls).items():
            if kind in checks:
                yield pytest.param(node_id, name, kind, id=f"{node_id}.{name}")


CASES = list(socket_cases())


@pytest.mark.parametrize("node_id,name,kind", CASES)
def test_wrong_socket_data_is_named(node_id, name, kind):
    cls = NODE_CLASS_MAPPINGS[node_id]
    wrong = {"IMAGE": torch.zeros(4, 4), "MASK": "a string"}.get(kind, torch.zeros(1, 8, 8, 3))
    with pytest.raises(UnconfusedError, match=rf"\[{node_id}\] input '{name}': expected .*got"):
        getattr(cls(), cls.FUNCTION)(**{name: wrong})


@pytest.mark.parametrize("node_id,name,kind", [c for c in CASES if c.values[2] in ("IMAGE", "MASK")])
def test_empty_batches_are_named(node_id, name, kind):
    cls = NODE_CLASS_MAPPINGS[node_id]
    empty = torch.zeros(0, 8, 8, 3) if kind == "IMAGE" else torch.zeros(0, 8, 8)
    with pytest.raises(UnconfusedError, match=rf"\[{node_id}\] input '{name}': the {kind} batch is empty"):
        getattr(cls(), cls.FUNCTION)(**{name: empty})


def test_the_matrix_covers_every_node_with_sockets():
    with_sockets = {c.values[0] for c in CASES}
    assert len(CASES) >= 15 and {"UnconfusedTrainLoRA", "UnconfusedSample", "UnconfusedConcept"} <= with_sockets


def test_every_matrix_entry_names_an_existing_test():
    """The hardening matrix (README's counts) cannot name a test that was renamed or removed."""
    import importlib

    from hardening_matrix import MATRIX, entries

    assert len(MATRIX) == 12 and all(MATRIX.values())  # 8 kinds + the 4 of issue 21
    for key in entries():
        module, name = key.split("::")
        assert callable(getattr(importlib.import_module(module.removesuffix(".py")), name, None)), key
