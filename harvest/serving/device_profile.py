"""DeviceProfile: the host tuning one device needs, chosen once at a worker's entry point.

On the CPU device the engine computes on the same cores as everything around it (the HTTP
stack, the queue's I/O thread, Ray's daemons), so the worker trades a little offline
throughput for the serving path's latency. On CUDA the host only launches kernels and
none of that applies: the cuda profile changes nothing. The simulated device (`sim`) is
a GPU stand-in whose forward is a sleep: like a GPU it needs no offline pacing or thread
pool, but its host Python shares the box's cores like the CPU device's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    """`None` leaves a setting at the interpreter's, torch's or Ray's default."""

    # Several threads share a worker's GIL: the engine loop, the event loop streaming tokens
    # out over HTTP, the queue's I/O thread, the checkpoint shipper. At Python's default 5 ms
    # switch interval a token waiting to leave waits for a step's Python to yield.
    switch_interval_s: float | None = None
    # EngineLoop's offline pacing: an offline-only step within a second of online work is
    # followed by a pause this many times as long as itself (a submission ends it at once),
    # so the serving path gets the cores back for the next request's way in.
    offline_yield: float = 0.0
    # torch's intra-op threads: as many as the CPUs the worker was given, or workers fight
    # for cores.
    torch_threads: int | None = None
    # Ray starts its worker processes (our engines and their HTTP servers) at nice 15, below
    # its own daemons and the driver; on a busy node the serving path then waits for them.
    worker_niceness: int | None = None

    @classmethod
    def for_device(cls, device: str, cpus: int | None = None) -> DeviceProfile:
        """The profile of `device` ('cpu', 'cuda[:N]', 'sim[:PROFILE]'); `cpus`: the CPUs
        this worker may use (torch's thread pool on the CPU device)."""
        kind = device.split(":", 1)[0]
        if kind == "cpu":
            return cls(
                switch_interval_s=0.0005,
                offline_yield=1.0,
                torch_threads=max(1, cpus) if cpus is not None else None,
                worker_niceness=0,
            )
        if kind == "sim":
            return cls(switch_interval_s=0.0005, worker_niceness=0)
        if kind == "cuda":
            return cls()
        raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'sim[:PROFILE]', got {device!r}")

    def apply(self) -> None:
        """Set this process's interpreter and torch settings (a worker's entry point)."""
        if self.switch_interval_s is not None:
            sys.setswitchinterval(self.switch_interval_s)
        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)

    def ray_env(self) -> dict[str, str]:
        """Environment for a Ray started from here (Ray reads it when it starts)."""
        return {} if self.worker_niceness is None else {"RAY_worker_niceness": str(self.worker_niceness)}
