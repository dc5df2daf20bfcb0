"""`harvest model ...`: local model utilities."""

from pathlib import Path

import typer
from rich.console import Console

from harvest.cli.app import app

model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("make-tiny")
def make_tiny_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the model and tokenizer to."),
    arch: str = typer.Option("llama", help="llama | qwen2 | mistral | gpt2"),
    hidden: int = typer.Option(64, help="Hidden size."),
    layers: int = typer.Option(2, help="Transformer layers."),
    seed: int = typer.Option(0, help="Weight initialisation seed."),
    train_seconds: float = typer.Option(0.0, "--train-seconds", help="Fit to the bundled corpus this long."),
) -> None:
    """Build a small seeded model + tokenizer locally (no downloads), saved with save_pretrained."""
    from harvest.models.tiny import ARCHS, make_tiny

    if arch not in ARCHS:
        raise typer.BadParameter(f"must be one of {', '.join(ARCHS)}", param_hint="--arch")
    path = make_tiny(out_dir, arch, hidden=hidden, layers=layers, seed=seed, train_seconds=train_seconds)
    Console().print(f"[green]wrote[/] {arch} model to {path}")
