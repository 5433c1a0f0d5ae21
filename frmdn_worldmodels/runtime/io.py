"""Files that survive a crash: atomic writes, validated checkpoints, append-only metrics.

Everything is written to a temporary name in the target folder and renamed, so a reader sees either the old
file or the whole new one, never half a file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """A file on disk that is missing, truncated or of the wrong layout; the message names the file."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would have (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            # the file being written, not the temporary name, is what the user can act on
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


def append_jsonl(path: str | Path, obj: dict) -> None:
    """Append one JSON object as a line (metrics logs; a torn last line is skipped by ``read_jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(obj) + "\n")
        handle.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
    return rows


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The bytes of a compressed npz holding ``arrays``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Compressed npz, written atomically."""
    atomic_write_bytes(path, npz_bytes(**arrays))


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an npz (no pickles), or a DataError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as error:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error...: all mean a broken file
        raise DataError(f"{path}: unreadable or truncated npz ({type(error).__name__}: {error})") from None


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    """torch.save of plain data (state_dicts, config dicts, numbers, lists), written atomically."""
    import torch  # here, not at the top: Ray's collection workers import this module and never need torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint this program wrote, with ``weights_only=True`` (never unpickles code)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to unpickle means an unusable file
        raise DataError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: not a checkpoint of this program (top level is {type(payload).__name__})")
    return payload
