"""Optional Bearer API keys, read from an environment variable or a file and compared in constant time."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from sapguard.errors import SapError


def load_api_keys(env_var: str | None, key_file: str | Path | None) -> list[bytes]:
    """Keys from ``$env_var`` (comma-separated) and ``key_file`` (one per line, ``#`` comments).

    An empty list means the server runs without authentication. Keys are never taken from the
    command line, where other users of the machine could read them.
    """
    keys: list[str] = []
    if env_var and os.environ.get(env_var):
        keys += [k.strip() for k in os.environ[env_var].split(",")]
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SapError(f"{path}: cannot read API keys ({err.__class__.__name__})") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not any(keys):
            raise SapError(f"{path}: no API keys in the file")
    return [k.encode("utf-8") for k in keys if k]


class KeyChecker:
    """Checks an ``Authorization`` header against the configured keys in constant time."""

    def __init__(self, keys: list[bytes]):
        self._keys = list(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """True when auth is off or the header is ``Bearer <a configured key>``."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode("utf-8")
        ok = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"
