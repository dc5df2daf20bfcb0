"""`harvest bench engine`: offline throughput of the engine at saturation vs two baselines.

- bare loop: the same model's forward over a static, left-padded batch with transformers'
  DynamicCache, greedy, no scheduling at all. What the machine can do; the engine's ceiling.
- transformers continuous batching: `model.generate_batch` on the same prompts.

All three generate the same number of tokens from the same prompts (eos ignored), each
timed best-of-N after a warm-up, side by side in one process.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from workloads.bench.common import console, print_table, write_result


def _prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in lengths]


def engine_run(engine, prompts: list[list[int]], max_tokens: int) -> int:
    from harvest.engine import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return sum(o.num_output_tokens for o in outs)


@torch.inference_mode()
def bare_loop_run(model, prompts: list[list[int]], max_tokens: int) -> int:
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    for _ in range(max_tokens - 1):
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        out = model(input_ids=next_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return len(prompts) * max_tokens


def hf_cb_run(model, prompts: list[list[int]], max_tokens: int) -> int:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(prompts, generation_config=config)
    return sum(len(o.generated_tokens) for o in out.values())


def _best_rate(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - start))
    return max(rates), rates


def run(quick: bool, out: Path, model: str | None = None, device: str = "cpu") -> dict:
    """`model`: a model directory to measure instead of the built tiny one; `device`: cpu or
    cuda[:N] (on CUDA, both the engine and transformers run in the checkpoint's dtype)."""
    import logging

    import transformers
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM

    from harvest.engine import Engine
    from harvest.models.tiny import make_tiny

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    cfg = (
        dict(num_prompts=16, min_len=16, max_len=64, max_tokens=16, hidden=128, layers=2, repeats=2)
        if quick
        else dict(num_prompts=64, min_len=32, max_len=128, max_tokens=64, hidden=256, layers=4, repeats=3)
    )
    dtype = "float32" if device == "cpu" else "auto"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model or make_tiny(
            Path(tmp) / "bench-llama", "llama", hidden=cfg["hidden"], layers=cfg["layers"]
        )
        prompts = _prompts(cfg["num_prompts"], cfg["min_len"], cfg["max_len"], vocab=500)
        n, repeats = cfg["max_tokens"], cfg["repeats"]
        engine = Engine.from_pretrained(
            str(model_dir), max_num_seqs=cfg["num_prompts"], device=device, dtype=dtype
        )
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        systems = {
            "engine": lambda: engine_run(engine, prompts, n),
            "bare_loop": lambda: bare_loop_run(hf_model, prompts, n),
            "hf_cb": lambda: hf_cb_run(hf_model, prompts, n),
        }
        rates: dict[str, float] = {}
        samples: dict[str, list[float]] = {}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("engine bench", total=len(systems))
            for name, fn in systems.items():
                progress.update(task, description=f"measuring {name}")
                rates[name], samples[name] = _best_rate(fn, repeats)
                progress.advance(task)
    result = {
        "engine_tokens_per_s": rates["engine"],
        "bare_loop_tokens_per_s": rates["bare_loop"],
        "hf_cb_tokens_per_s": rates["hf_cb"],
        "engine_vs_bare_loop": rates["engine"] / rates["bare_loop"],
        "engine_vs_hf_cb": rates["engine"] / rates["hf_cb"],
        "samples_tokens_per_s": samples,
        "median_tokens_per_s": {k: statistics.median(v) for k, v in samples.items()},
        "config": {**cfg, "quick": quick, "arch": "llama", "device": device, "model": model or "tiny"},
        "targets": {"engine_vs_bare_loop": 0.8, "engine_vs_hf_cb": 1.0},
    }
    print_table(
        f"engine throughput ({cfg['num_prompts']} prompts x {n} tokens, output tokens/s)",
        ["system", "tokens/s (best)", "median", "vs engine"],
        [[k, rates[k], result["median_tokens_per_s"][k], rates[k] / rates["engine"]] for k in rates],
    )
    _plot(rates, out / "engine.png", device)
    write_result(out, "engine", result)
    return result


def _plot(rates: dict[str, float], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"engine": "harvest engine", "bare_loop": "bare forward loop", "hf_cb": "transformers CB"}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([labels[k] for k in rates], list(rates.values()), color=["tab:green", "tab:gray", "tab:blue"])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Offline throughput at saturation ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
