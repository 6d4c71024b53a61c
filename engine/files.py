"""Writing files so that a failed or cancelled run never leaves half of one.

Every file a stage writes goes through `atomic_path` / `atomic_write_*`: the data goes to a
temporary name in the same folder, and is renamed over the final name only once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import UnconfusedError

_UNSAFE = re.compile(r"[^A-Za-z0-9._\- ]+")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` if the block succeeds."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.exists():
            raise UnconfusedError(f"nothing was written to {final}")
        os.replace(tmp, final)
    except OSError as e:
        raise UnconfusedError(f"could not write {final}: {e.strerror or e}. Check that the folder "
                              "is writable and the disk is not full") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def atomic_save_image(path: str | os.PathLike, image, **save_kwargs) -> Path:
    """Save a PIL image; the format comes from the final name's suffix."""
    final = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(final.suffix.lower(), "PNG")
    with atomic_path(final) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)
    return final


def safe_name(name: str, *, input: str = "name", node: str | None = None) -> str:
    """A file or folder name that cannot leave its parent folder ('../x', '/etc', 'a/b')."""
    cleaned = _UNSAFE.sub("_", name.strip()).strip(" .")
    if not cleaned or cleaned in {".", ".."}:
        raise UnconfusedError(f"'{name}' is not usable as a file name; use letters, digits, '-', '_'",
                              node=node, input=input)
    return cleaned


def inside(base: str | os.PathLike, relative: str, *, input: str = "path", node: str | None = None) -> Path:
    """`base/relative`, refusing anything that would resolve outside `base`."""
    base_p = Path(base).resolve()
    target = (base_p / relative).resolve()
    if target != base_p and base_p not in target.parents:
        raise UnconfusedError(f"'{relative}' points outside {base_p}; give a name inside that folder",
                              node=node, input=input)
    return target
