"""`harvest bench SUITE [--quick] [--out DIR] [--repeat N]`: one entry point for every benchmark suite."""

from importlib import import_module
from pathlib import Path

import typer

from harvest.cli.app import app

# suite name -> module in workloads/bench exposing `run(quick: bool, out: Path) -> dict`
SUITES = {
    "engine": "workloads.bench.engine",
    "coserve": "workloads.bench.coserve",
    "e2e": "workloads.bench.e2e",
    "peers": "workloads.bench.peers",
    "queue": "workloads.bench.queue",
    "chaos": "workloads.bench.chaos",
    "soak": "workloads.bench.soak",
    "scale": "workloads.bench.scale",
    "sampler": "workloads.bench.sampler",
    "prefix": "workloads.bench.prefix",
    "batch": "workloads.bench.batch",
}


@app.command()
def bench(
    suite: str = typer.Argument(..., help=f"One of: {', '.join(SUITES)}."),
    quick: bool = typer.Option(False, "--quick", help="Small CI-sized run (under 3 minutes on 2 cores)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Directory for SUITE.json and plots."),
    repeat: int = typer.Option(
        1, "--repeat", min=1, help="peers only: measure N rounds, the systems interleaved; report the median."
    ),
    minutes: float | None = typer.Option(
        None, "--minutes", min=0.5, help="soak only: how long to run (default 10, --quick 2)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="engine and coserve only: a model directory instead of the built tiny one."
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="engine and coserve only: cpu or cuda[:N]; coserve also sim[:PROFILE], the simulated GPU, "
        "or sim:fit, this host's own step costs fitted at start-up, in virtual time.",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="coserve only: another trace and backlog (default 0)."
    ),
) -> None:
    """Run a benchmark suite: prints a table, writes OUT/SUITE.json and PNG plots."""
    if suite not in SUITES:
        raise typer.BadParameter(
            f"unknown suite {suite!r}; choose from {', '.join(SUITES)}", param_hint="SUITE"
        )
    if repeat != 1 and suite != "peers":
        raise typer.BadParameter("only the peers suite repeats its rounds", param_hint="--repeat")
    out.mkdir(parents=True, exist_ok=True)
    if minutes is not None and suite != "soak":
        raise typer.BadParameter("only the soak suite takes --minutes", param_hint="--minutes")
    if (model is not None or device != "cpu") and suite not in ("engine", "coserve"):
        raise typer.BadParameter("only the engine and coserve suites take --model and --device")
    if device.split(":", 1)[0] == "sim" and suite != "coserve":
        raise typer.BadParameter("only the coserve suite runs on the simulated device", param_hint="--device")
    if seed is not None and suite != "coserve":
        raise typer.BadParameter("only the coserve suite takes --seed", param_hint="--seed")
    options = {"repeat": repeat} if suite == "peers" else {"minutes": minutes} if suite == "soak" else {}
    if suite in ("engine", "coserve"):
        options = {"model": model, "device": device}
    if seed is not None:
        options["seed"] = seed
    import_module(SUITES[suite]).run(quick=quick, out=out, **options)
