"""The `sap` command line. Each module holds its commands as plain functions and registers them here."""

from __future__ import annotations

import typer

from sapguard.cli import core, interpret, serve, steer

app = typer.Typer(
    name="sap",
    help="sapguard: learn a safety polytope inside a language model; detect, steer and inspect with it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (core, interpret, steer, serve):
    _module.register(app)

__all__ = ["app"]
