"""Atomic file writes and checksums: every file sapguard writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, overload


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` and rename it over ``path`` on success.

    Args:
        path: Final destination.
        mode: ``"w"`` (text, UTF-8) or ``"wb"``.

    Example:
        >>> with atomic_write("out.json") as fh:  # doctest: +SKIP
        ...     fh.write("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_tmp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary path in the directory of ``path``, for writers that need a file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@overload
def read_json(
    path: str | os.PathLike[str], what: str, *, hint: str | None = None, require_object: Literal[True] = True
) -> dict[str, Any]: ...


@overload
def read_json(path: str | os.PathLike[str], what: str, *, hint: str | None = None, require_object: bool) -> Any: ...


def read_json(path: str | os.PathLike[str], what: str, *, hint: str | None = None, require_object: bool = True) -> Any:
    """Read a JSON file; one-line SapError naming it when missing or malformed.

    Args:
        path: The JSON file.
        what: What the file is, for messages (e.g. ``"config"``, ``"metrics"``).
        hint: What the folder should be, added to the "not found" message.
        require_object: Refuse anything but a JSON object.

    Returns:
        The JSON object (a ``dict``), or with ``require_object=False`` any JSON value.
    """
    from sapguard.errors import SapError

    path = Path(path)
    if not path.is_file():
        raise SapError(f"{path}: not found; is {path.parent} {hint}?" if hint else f"{path}: {what} file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SapError(f"{path}: malformed {what} JSON ({err})") from None
    if require_object and not isinstance(obj, dict):
        raise SapError(f"{path}: expected a JSON object")
    return obj
