"""Keep freed tensor memory inside the process on Linux (glibc malloc) during CPU training.

glibc serves big blocks with fresh ``mmap`` pages and gives them back to the OS when they are
freed (blocks above a threshold it moves at run time, and always above 32 MiB), and it trims
the top of its heap. A training step that allocates the same activations every step then pays,
every step, for page faults that zero fresh memory. Serving every block from the heap and
keeping freed memory there gives a steady, faster step. On a 2-core AMD EPYC, CoAtNet-0 trains
1.21-1.27x as fast as with glibc's defaults at 64 px / batch 16, 1.25x at 224 px / batch 8 and
2.1-2.4x at 224 px / batch 32 (two runs), where many activations are over 32 MiB; pinning the
thresholds alone, with mmap still on, leaves that last case at the defaults' speed
(``benchmarks/results/cpu_ablation.md``). The same as starting Python with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=1073741824``, or close to jemalloc/tcmalloc preloaded. The cost: the
process keeps its peak heap (peak RSS 7.8 instead of 7.1 GiB at 224 px / batch 32).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Serve every block from glibc's heap and keep 1 GiB free there. True if set.

    Does nothing (False) off Linux/glibc, or when the user already chose: glibc ``MALLOC_*``
    variables, malloc ``GLIBC_TUNABLES``, or another allocator in ``LD_PRELOAD``.
    """
    if not sys.platform.startswith("linux"):
        return False
    if (any(os.environ.get(name) for name in _USER_SETTINGS)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or os.environ.get("LD_PRELOAD", "").strip()):
        logger.debug("malloc settings left as the environment chose")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # With mmap off glibc still falls back to it when the heap cannot grow.
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
