"""The `sap` command line. Each module registers its commands on the one Typer app."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sap",
    help="sapguard: learn a safety polytope inside a language model; detect, steer and inspect with it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from sapguard.cli import core  # noqa: E402

core.register(app)
from sapguard.cli import interpret as _interpret; _interpret.register(app)  # noqa: E402, E702
from sapguard.cli import steer as _steer; _steer.register(app)  # noqa: E402, E702
from sapguard.cli import serve as _serve; _serve.register(app)  # noqa: E402, E702

__all__ = ["app"]
