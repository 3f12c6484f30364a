"""The ``ernie45`` command line. Each subcommand's work lives in its own module; this file wires them."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    name="ernie45",
    help="Fine-tune, run and evaluate ERNIE 4.5 models (dense and MoE) on CPU or GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ernie45 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """ERNIE 4.5 toolkit."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
