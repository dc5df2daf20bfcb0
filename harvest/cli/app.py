"""The root typer app shared by the command modules."""

import typer

app = typer.Typer(
    name="harvest",
    help="Co-serve online LLM traffic and offline batch jobs on the same GPUs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
