"""Engine configuration: one dataclass per layer, validated on construction."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_bytes
    kv_cache_bytes: int = 512 * 2**20
    # on CUDA: this fraction of the device memory free after the weights load, instead of
    # kv_cache_bytes (`--kv-cache-memory 0.8`)
    kv_cache_fraction: float | None = None
    enable_prefix_caching: bool = True  # share full blocks of equal prefixes (block_manager.py)

    def __post_init__(self) -> None:
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if self.kv_cache_fraction is not None and not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


class Policy(str, enum.Enum):
    """How online and offline requests share the engine (compared by `harvest bench coserve`)."""

    ONLINE_ONLY = "online-only"  # offline requests are never scheduled
    FCFS = "fcfs"  # one queue, no classes: naive co-location
    PRIORITY_RECOMPUTE = "priority-recompute"  # online first; evicted offline work restarts (vLLM)
    HARVEST = "harvest"  # online first, SLO-aware offline budget, checkpoints, layer-level abort


@dataclass
class SLOConfig:
    """Online latency targets the harvest policy sizes offline work against."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1
    headroom: float = 0.8  # plan steps to this fraction of the targets: predictions and clocks are noisy
    # offline work leaves each decoding request the slack to absorb this quantile of how far
    # the steps with online work that overran the TPOT target overran it (scheduler.observe)
    reserve_quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError(f"SLO targets must be > 0, got ttft_s={self.ttft_s}, tpot_s={self.tpot_s}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")
        if not 0 <= self.reserve_quantile <= 1:
            raise ValueError(f"reserve_quantile must be in [0, 1], got {self.reserve_quantile}")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 64
    policy: Policy = Policy.HARVEST
    slo: SLOConfig = field(default_factory=SLOConfig)
    # harvest: an online prompt's prefill is cut to what the decoding online requests can
    # wait for (Scheduler._online_prefill_budget); off, it runs whole as under online-only
    cut_online_prefills: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        try:
            self.policy = Policy(self.policy)
        except ValueError:
            raise ValueError(
                f"policy must be one of {[p.value for p in Policy]}, got {self.policy!r}"
            ) from None

    @property
    def has_classes(self) -> bool:
        return self.policy is not Policy.FCFS

    @property
    def checkpoints(self) -> bool:
        return self.policy is Policy.HARVEST


@dataclass
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"  # or "auto": the checkpoint's dtype on CUDA, float32 on CPU
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    profile_latency: bool = True  # profile step latency at start-up (harvest policy only)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.simulated:
            from harvest.engine.sim_profile import profile_for

            profile_for(self.device)  # raises naming the profiles there are
        elif not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'sim[:PROFILE]', got {self.device!r}")

    @property
    def simulated(self) -> bool:
        """A simulated device (harvest/engine/sim_runner.py): the forward is a profiled sleep."""
        return self.device == "sim" or self.device.startswith("sim:")
