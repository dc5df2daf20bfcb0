"""Step-latency profiles of the simulated device: what one engine step costs on some hardware.

A profile is the latency model's own linear form (harvest/engine/latency_model.py) with
fixed weights over the same six features: constant, tokens computed, decode sequences,
prefill chunks, padded decode context (decodes x longest context / 1024) and prefill
attention work (query x key tokens / 1024). The simulated runner sleeps for what a
profile predicts, so the real scheduler, latency model and queue see a device with that
hardware's shape, on a CPU that does almost none of the work.

Two kinds of numbers live here:
- `cpu-tiny`: measured. The least-squares fit the engine's own start-up profile
  (`Engine.profile_latency`, the grid of `latency_model.profile_grid`) found for the tiny
  random Llama of `harvest.models.tiny` (hidden 64, 2 layers, vocab 512, float32) on the
  2-core CI box, 2026-12-03. Busy-box noise moves these by tens of percent.
- `h100-8b`, `a100-8b`: derived, not measured. A Llama-3-8B-shaped model (32 layers, 8 KV
  heads of 128, bf16: 16 GB of weights, 128 KiB of KV per token) on one GPU, from the
  hardware's datasheet bandwidth and bf16 peak with stated efficiencies (`roofline`), and
  checked against published serving numbers:
  * NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOPS dense bf16; A100 80GB SXM:
    2.04 TB/s HBM2e, 312 TFLOPS dense bf16.
  * vLLM v0.6.0 performance update (blog.vllm.ai/2024/09/05/perf-update.html): Llama 3 8B
    on one H100, TPOT in the low milliseconds once CPU overhead is off the critical path;
    i.e. a decode step costs about the weight read plus a small launch overhead.
  * Lambda Labs vllm-benchmark (github.com/LambdaLabsML/vllm-benchmark): H100 about 2x
    the A100's throughput and lower TPOT for 7-8B models on vLLM.
  * "Memory-Bound but Not Bandwidth-Limited" (arXiv, 2026; batch-1 decode of 7-8B GQA
    models on H100/A100/L40S/L4): at batch 1 the H100 reaches well under its bandwidth
    floor, launch overhead fills the gap (CUDA graphs cut it ~1.26x): hence a constant of
    a millisecond or more on top of the weight read.
  * ConServe (Qiao et al., arXiv 2410.01228, Llama-3.1-8B on H100): decode is memory
    bound, so offline tokens added to a small online decode batch are nearly free; the
    effect the harvest policy exploits.
  What follows from them: a decode step at batch 1 costs the weight read (16 GB / 3.35
  TB/s = 4.8 ms on an H100) plus launch overhead; each extra token adds its 16 GFLOP at
  ~60% of peak (27 us on an H100), so at short contexts batch 64 costs about 1.3x batch 1
  (nearly flat) and a 512-token prefill about 3x a decode step (linear in tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from harvest.engine.latency_model import NUM_FEATURES, BatchShape


@dataclass(frozen=True)
class StepProfile:
    """Seconds per unit of each of the latency model's six features; `layers` is how many
    abort points (layer boundaries) a simulated step has."""

    name: str
    weights: tuple[float, ...]
    layers: int
    source: str

    def __post_init__(self) -> None:
        if len(self.weights) != NUM_FEATURES or any(w < 0 for w in self.weights):
            raise ValueError(f"profile {self.name!r}: weights must be {NUM_FEATURES} numbers >= 0")
        if self.layers < 1:
            raise ValueError(f"profile {self.name!r}: layers must be >= 1, got {self.layers}")

    def predict(self, shape: BatchShape) -> float:
        if shape.seqs == 0:
            return 0.0
        return sum(w * f for w, f in zip(self.weights, shape.features()))


def roofline(
    name: str,
    *,
    params: float,
    layers: int,
    kv_bytes_per_token: float,
    bandwidth: float,
    peak_flops: float,
    launch_s: float,
    mfu: float = 0.6,
    attention_efficiency: float = 0.4,
    bytes_per_param: int = 2,
) -> StepProfile:
    """Weights of a GPU profile from hardware numbers (bytes/s, FLOP/s), a dense model of
    `params` parameters, and the efficiencies real kernels reach (defaults: ~60% of peak
    for GEMMs, ~40% for attention)."""
    weight_read = params * bytes_per_param / bandwidth
    per_token = 2 * params / (peak_flops * mfu)
    # a decode sequence's own cost beyond its token and its KV read: metadata, sampling
    per_decode = 5e-6
    # a prefill chunk launches its own attention per layer (~5 us each)
    per_chunk = layers * 5e-6
    # padded decode context: every layer reads 1024 tokens of KV per unit
    per_kv_unit = 1024 * kv_bytes_per_token / bandwidth
    # prefill attention work: 1024 query-key pairs per unit, QK^T and PV, every layer;
    # hidden size follows from params for a Llama-shaped model (~12 h^2 per layer)
    hidden = (params / (12 * layers)) ** 0.5
    per_attention_unit = 1024 * 4 * hidden * layers / (peak_flops * attention_efficiency)
    weights = (weight_read + launch_s, per_token, per_decode, per_chunk, per_kv_unit, per_attention_unit)
    return StepProfile(name, weights, layers, source="roofline: see harvest/engine/sim_profile.py")


LLAMA_8B = dict(params=8.0e9, layers=32, kv_bytes_per_token=2 * 32 * 8 * 128 * 2)

PROFILES: dict[str, StepProfile] = {
    "cpu-tiny": StepProfile(
        "cpu-tiny",
        (5.0e-4, 4.8e-6, 5.2e-6, 7.7e-4, 2.8e-4, 4.9e-7),
        layers=2,
        source="measured: Engine.profile_latency on the tiny Llama, 2-core CI box, 2026-12-03",
    ),
    "h100-8b": roofline("h100-8b", bandwidth=3.35e12, peak_flops=989e12, launch_s=1.5e-3, **LLAMA_8B),
    "a100-8b": roofline("a100-8b", bandwidth=2.04e12, peak_flops=312e12, launch_s=1.5e-3, **LLAMA_8B),
}
DEFAULT_PROFILE = "h100-8b"
FITTED = "fit"  # `sim:fit`: registered by whoever fitted it (`register_fitted`)


def register_fitted(weights: list[float], layers: int, source: str) -> StepProfile:
    """Make `sim:fit` the profile an engine's start-up fit found on this host.

    The simulated device then takes exactly this machine's own mean step costs, without its
    jitter, its cache and its neighbours: a scheduling policy can be compared on the same
    trace in virtual time, seed after seed, in seconds (the coserve bench's `--device
    sim:fit`), where on the CPU itself the box's speed moves more between two runs than
    the policies differ."""
    profile = StepProfile(FITTED, tuple(weights), layers, source)
    PROFILES[FITTED] = profile
    return profile


def profile_for(device: str) -> StepProfile:
    """The profile a `sim[:NAME]` device names (plain `sim`: the default GPU profile)."""
    _, _, name = device.partition(":")
    name = name or DEFAULT_PROFILE
    if name == FITTED and name not in PROFILES:
        raise ValueError(f"device {device!r}: no profile has been fitted on this host yet (register_fitted)")
    if name not in PROFILES:
        raise ValueError(
            f"device {device!r}: unknown sim profile {name!r}; choose from {', '.join(PROFILES)}"
        )
    return PROFILES[name]
