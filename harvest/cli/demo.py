"""`harvest demo`: the main job on the embedded default, for a first look."""

import time

import typer
from rich.console import Console
from rich.table import Table

from harvest.cli.app import app

PROMPTS = [
    "The miller",
    "Once upon a time there was a little",
    "To make bread, mix flour,",
    "Question: What is the capital of France? Answer:",
    "The city wakes up slowly.",
    "Review: The soup was perfect. Label:",
]


@app.command()
def demo(max_tokens: int = typer.Option(32, help="Tokens to generate per prompt.")) -> None:
    """Build the tiny demo model once, then batch-generate with the engine."""
    import transformers

    from harvest.engine import Engine, SamplingParams
    from harvest.paths import default_model_dir, ensure_default_model

    transformers.utils.logging.disable_progress_bar()
    console = Console()
    if not (default_model_dir() / "config.json").exists():
        with console.status("training the tiny demo model on the bundled corpus (about a minute)..."):
            ensure_default_model()
    engine = Engine.from_pretrained(str(default_model_dir()))
    start = time.perf_counter()
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0))
    elapsed = time.perf_counter() - start
    table = Table("prompt", "completion", "finish")
    for prompt, out in zip(PROMPTS, outputs):
        table.add_row(prompt, out.text.strip(), out.finish_reason.value)
    console.print(table)
    tokens = sum(o.num_output_tokens for o in outputs)
    console.print(
        f"{len(outputs)} requests, {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.0f} tok/s)"
    )
