"""Keep freed host memory in the process on a CPU engine, instead of handing it back to the
kernel after every step.

A CPU step allocates and frees its activations (megabytes each) every step. glibc serves
blocks above its mmap threshold with a fresh `mmap` and returns them with `munmap`, and
trims the heap's top above its trim threshold, so each step maps pages again and the
kernel zeroes them on first touch: on the coserve bench's model, 20,000-27,000 page faults a
second, and the unmaps' TLB shootdowns interrupt the other core's torch thread. Those
steps had a tail: 6-7 of ~2,400 ran past twice their prediction, at most 3.1-3.7x. With
the thresholds fixed high (what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc),
the same replay took ~540 faults a second, 0-3 steps past 2x, at most 1.9-2.7x, at the same
throughput (docs/BENCHMARKS.md, coserve).

Only a CPU engine asks for it: on a GPU the activations live in CUDA's caching allocator
and host allocations are small. The setting is the process's, so it is made once; it
costs the process up to `trim_threshold` of freed memory it keeps for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the dynamic threshold on 64-bit
TRIM_THRESHOLD = 256 << 20

_kept = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True once they are set
    (False where the C library is not glibc: other allocators keep freed memory anyway)."""
    global _kept
    if _kept:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt answers 1 on success; setting the mmap threshold also stops glibc from moving it
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _kept = bool(mapped and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _kept:
        log.warning("mallopt refused the malloc thresholds: CPU steps keep mapping fresh pages")
    return _kept
