"""The root typer app shared by the command modules."""

from importlib.metadata import PackageNotFoundError, version

import typer

app = typer.Typer(
    name="harvest",
    help="Co-serve online LLM traffic and offline batch jobs on the same GPUs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def harvest_version() -> str:
    try:
        return version("harvest")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"harvest {harvest_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    """Co-serve online LLM traffic and offline batch jobs on the same GPUs."""
