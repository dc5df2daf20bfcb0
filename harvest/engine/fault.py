"""Which request a failed step belongs to: a fault costs exactly what caused it.

A step that raises must cost the request that caused it, not the engine and everything in
flight with it. Sampling is per row, so a row that fails names its request at once. A
forward runs the whole batch, so its requests are bisected: halves are re-run without
committing anything (their keys/values land in slots past each request's
`num_computed_tokens`, which the next step simply writes again) until each failing request
is alone.

A request is blamed only when the engine is seen to work without it: some other forward
(or sample) in the search succeeded, or a one-token probe does. Otherwise the fault is the
engine's (a broken model, a dead device) and is raised, as are out-of-memory and device
errors at once: retrying those on halves of the batch would only hide them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harvest.engine.request import Request
from harvest.engine.sampling import SamplingParams

Execute = Callable[[list[Request], list[int]], torch.Tensor]
Sample = Callable[[torch.Tensor, list[SamplingParams], list[int | None], list[int]], list[int]]

# a CUDA error is sticky: the context is unusable for every request, not only the one that hit it
_DEVICE_ERRORS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "CUDNN_STATUS", "HIP error")


def is_engine_fault(exc: BaseException) -> bool:
    """Errors no request can be blamed for: out of memory, a failed device."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return any(marker in str(exc) for marker in _DEVICE_ERRORS)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def isolate_forward(
    execute: Execute, requests: Sequence[Request], num_new_tokens: Sequence[int], error: Exception
) -> dict[str, Exception]:
    """The requests whose forward fails alone, each with its error, after the whole batch
    raised `error`. Raises `error` (or an engine fault met on the way) when no request can
    be blamed."""
    culprits: dict[str, Exception] = {}
    worked = False

    def bisect(rows: list[int], exc: Exception) -> None:
        nonlocal worked
        if len(rows) == 1:
            culprits[requests[rows[0]].request_id] = exc
            return
        mid = len(rows) // 2
        for half in (rows[:mid], rows[mid:]):
            try:
                execute([requests[i] for i in half], [num_new_tokens[i] for i in half])
                worked = True
                continue
            except Exception as half_error:
                if is_engine_fault(half_error):
                    raise
                failed = half_error
            bisect(half, failed)  # outside the handler: errors deeper down do not chain onto this one

    bisect(list(range(len(requests))), error)
    # no culprit: the batch fails only as a whole, and would fail again next step
    if not culprits:
        raise error
    if not worked:
        first = next(r for r in requests if r.request_id in culprits)
        if not _forward_works(execute, first):
            raise error
    return culprits


def _forward_works(execute: Execute, culprit: Request) -> bool:
    """Does any forward work? One token of a fresh sequence, written into the last block
    of `culprit` (finished right after, so no block has to be free for the probe). The last
    block holds this step's uncomputed tokens, so it is the culprit's own: earlier ones may
    be shared through the prefix cache."""
    probe = Request("fault-probe", [0], SamplingParams(max_tokens=1))
    probe.block_table = culprit.block_table[-1:]
    try:
        execute([probe], [1])
    except Exception:
        return False
    return True


def sample_rows(
    sample: Sample, logits: torch.Tensor, requests: Sequence[Request]
) -> tuple[list[int], dict[str, Exception]]:
    """One token per request (row of `logits`), and the error of each request whose own
    row fails to sample. Raises when the sampler fails without any request's help."""
    params = [r.params for r in requests]
    seeds = [r.seed for r in requests]
    positions = [r.num_tokens for r in requests]
    try:
        return sample(logits, params, seeds, positions), {}
    except Exception as error:
        if is_engine_fault(error):
            raise
        batch_error = error
    tokens: list[int] = []
    errors: dict[str, Exception] = {}
    for row, req in enumerate(requests):
        try:
            tokens += sample(logits[row : row + 1], params[row : row + 1], seeds[row : row + 1],
                             positions[row : row + 1])  # fmt: skip
        except Exception as exc:
            if is_engine_fault(exc):
                raise
            errors[req.request_id] = exc
            tokens.append(-1)  # never used: the request finishes with its error
    if not errors:
        raise batch_error  # fails only as a whole
    if len(errors) == len(requests):
        try:  # a sound row: maximal entropy, sampled with a fixed seed
            sample(torch.zeros_like(logits[:1]), [SamplingParams()], [0], [0])
        except Exception:
            raise batch_error from None
    return tokens, errors
