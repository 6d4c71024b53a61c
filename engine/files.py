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
MAX_NAME_CHARS = 120


PARTIAL = ".partial"


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie counts as ended)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return True


def _umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_failure(final: Path, e: BaseException) -> str | None:
    """Why writing `final` failed, for the errors the writers really raise on a full or read-only
    disk: OSError (open/write/rename, PIL), safetensors' SafetensorError, torch.save's
    RuntimeError from its zip writer (inline_container.cc). None: not a write failure."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if type(e).__name__ != "SafetensorError" and not (
            isinstance(e, RuntimeError) and any(k in text for k in ("inline_container", "PytorchStreamWriter",
                                                                     "file write failed", "No space left"))):
        return None
    folder = final.parent
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "Read-only file system"
        if os.statvfs(folder).f_bavail == 0 or "No space left" in text:
            return "No space left on device"
    return text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file; on a read-only or vanished folder there is nothing to do."""
    with contextlib.suppress(OSError):
        path.unlink()


_CLEANED: set[str] = set()


def clean_stale_partials(folder: str | os.PathLike, *, every: bool = False) -> int:
    """Remove the hidden `.partial` files a killed writer left in `folder`: those of processes
    that no longer run on this machine (or all of them with `every`, for a folder the caller
    owns, e.g. a locked run folder). Returns how many were removed."""
    n = 0
    folder = Path(folder)
    with contextlib.suppress(OSError):
        for p in folder.glob(f".*{PARTIAL}"):
            pid = p.name[:-len(PARTIAL)].rsplit(".", 1)[-1].split("-")[0]
            if every or (pid.isdigit() and not process_alive(int(pid))):
                with contextlib.suppress(OSError):
                    p.unlink()
                    n += 1
    return n


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` if the block succeeds.

    The temporary name carries the writer's process id, so the next writer into the folder
    removes what a killed process left. The file gets the mode a new file gets under the
    umask (0644 under 022), whatever mode the library created it with (safetensors: 0600)."""
    final = Path(path)
    tmp = final.with_name(f".{final.name[:200]}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}")  # < 255 bytes
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        key = str(final.parent)
        if key not in _CLEANED:  # once per folder and process: cheap for folders of many files
            _CLEANED.add(key)
            clean_stale_partials(final.parent)
        yield tmp
        if not tmp.exists():
            raise UnconfusedError(f"nothing was written to {final}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except Exception as e:
        reason = _write_failure(final, e)
        if reason is None:
            raise
        raise UnconfusedError(f"could not write {final}: {reason}. Check that the folder "
                              "is writable and the disk is not full") from e
    finally:
        _remove_quietly(tmp)


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
def safe_name(name: str, *, input: str = "name") -> str:
    """A file or folder name that cannot leave its parent folder ('../x', '/etc', 'a/b')."""
    cleaned = _UNSAFE.sub("_", name.strip()).strip(" .")
    if not cleaned or cleaned in {".", ".."}:
        raise UnconfusedError(f"'{name}' is not usable as a file name; use letters, digits, '-', '_'", input=input)
    if len(cleaned) > MAX_NAME_CHARS:  # with a suffix and a token it must still fit a file name (255 bytes)
        raise UnconfusedError(f"'{cleaned[:40]}...' is {len(cleaned)} characters long; use at most "
                              f"{MAX_NAME_CHARS}", input=input)
    return cleaned


def inside(base: str | os.PathLike, relative: str, *, input: str = "path") -> Path:
    """`base/relative`, refusing anything that would resolve outside `base`."""
    base_p = Path(base).resolve()
    target = (base_p / relative).resolve()
    if target != base_p and base_p not in target.parents:
        raise UnconfusedError(f"'{relative}' points outside {base_p}; give a name inside that folder", input=input)
    return target
