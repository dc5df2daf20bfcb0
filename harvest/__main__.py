"""`python -m harvest`: the `harvest` command, where the console script is not on PATH."""

from harvest.cli import app

app(prog_name="harvest")
