"""What every `sap` command shares: one-line errors, JSON output, logging and text input."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from sapguard.data.records import check_texts, read_texts
from sapguard.errors import SapError

F = TypeVar("F", bound=Callable[..., Any])

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")
VERBOSE_OPTION = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr.")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn SapError (and a few expected OS errors) into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SapError as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            fail(f"{err.filename}: {err.strerror}")
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    """Print strict JSON (NaN/Inf become null) to stdout."""
    typer.echo(json.dumps(_clean(obj), indent=2, ensure_ascii=False, allow_nan=False))


def gather_texts(texts: list[str] | None, input_file: Path | None) -> list[str]:
    """Texts from arguments, ``--input FILE`` (lines or JSONL with ``prompt``) or stdin."""
    if texts and input_file:
        raise SapError("give texts as arguments or with --input, not both")
    if input_file is not None:
        return read_texts(input_file)
    if texts:
        return check_texts(texts)
    if not sys.stdin.isatty():
        lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
        if lines:
            return lines
    raise SapError("no texts: pass them as arguments, with --input FILE, or on stdin")


def gather_scan_items(texts: list[str] | None, input_file: Path | None) -> list[Any]:
    """What ``sap detect`` scans: texts as :func:`gather_texts` reads them, except that a JSONL
    ``--input`` row may hold a conversation, ``{"messages": [{"role": ..., "content": ...}, ...]}``,
    instead of a ``prompt`` (or ``text``). Bad rows are one-line errors naming the file and line."""
    if input_file is None or texts:
        return gather_texts(texts, input_file)
    data = input_file.read_bytes()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        bad_line = data[: err.start].count(b"\n") + 1
        raise SapError(f"{input_file}:{bad_line}: not valid UTF-8 ({err.reason})") from None
    if not (input_file.suffix.lower() == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))):
        return read_texts(input_file)
    from sapguard.detect import conversation_from_messages

    items: list[Any] = []
    for number, line in enumerate(lines, start=1):
        where = f"{input_file}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SapError(f"{where}: malformed JSON ({err.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            if "prompt" in row or "text" in row:
                raise SapError(f"{where}: give 'messages' or a 'prompt', not both")
            conversation_from_messages(row["messages"], where)  # validated here to name the line
            items.append(row["messages"])
            continue
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise SapError(f"{where}: expected an object with a non-empty 'prompt', 'text' or 'messages'")
        items.append(text)
    if not items:
        raise SapError(f"{input_file}: no texts")
    return items


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)
