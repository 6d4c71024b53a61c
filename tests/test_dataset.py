"""The augmented dataset format: streamed writes, partial-line repair, resume, reading."""

from __future__ import annotations

import pytest
from PIL import Image

from unconfused.engine import host
from unconfused.engine.data.augmented_dataset import Dataset, DatasetWriter, read_records
from unconfused.engine.errors import UnconfusedError


def _pair(i: int):
    img = Image.new("RGB", (32, 32), (i * 20 % 255, 10, 10))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    return img, {"<a>": mask, "policeman": Image.new("L", (32, 32), 0)}


def test_write_resume_and_read(tmp_path):
    folder = tmp_path / "ds"
    w = DatasetWriter(folder, seed=1, settings={"n": 3}, concepts=[{"token": "<a>", "class_word": "dog"}])
    for i in range(2):
        img, masks = _pair(i)
        w.add("mix", i, img, "a photo of <a> and a policeman", ["<a>"], masks, {"i": i})
    w._jsonl.write('{"id": "mix_000002", "kind": "mi')  # a write cut off mid-line
    w._jsonl.flush()
    ds = Dataset(folder)
    assert not ds.complete and len(ds) == 2 and "INCOMPLETE" in ds.describe()
    again = DatasetWriter(folder, seed=1, settings={"n": 3}, concepts=[{"token": "<a>", "class_word": "dog"}])
    assert len(again) == 2  # the partial line was dropped, the two good records kept
    img, masks = _pair(2)
    again.add("mix", 2, img, "a photo of <a> and a policeman", ["<a>"], masks)
    again.close(complete=True)
    ds = Dataset(folder)
    assert ds.complete and len(ds) == 3 and ds.manifest["counts"] == {"mix": 3}
    assert [r.id for r in read_records(folder)] == ["mix_000000", "mix_000001", "mix_000002"]
    ex = list(ds.examples())
    assert len(ex) == 3 and ex[0].mask.shape == (32, 32)
    assert float(ex[0].mask[:, :16].min()) == 1.0 and float(ex[0].mask[:, 16:].max()) == 0.0
    with pytest.raises(UnconfusedError, match=r"input 'name'.*other settings"):
        DatasetWriter(folder, seed=2, settings={"n": 3}, concepts=[])


def test_not_a_dataset_is_named(tmp_path):
    with pytest.raises(UnconfusedError, match=r"\[N\] input 'dataset'.*not an Unconfused dataset"):
        with host.running_node(name="N"):
            Dataset(tmp_path)
