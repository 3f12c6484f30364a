"""Keep freed host memory in the process for reuse (CPU training on Linux/glibc).

glibc hands large freed blocks back to the operating system: anything it mapped on its own (blocks
of 32 MB and more) and free memory at the top of its heap. A training step frees and allocates the
same sizes every step (the head's gradient and logits, activations, weight gradients), so each step
then writes into freshly mapped pages, and the first touch of each 4 KB page is a page fault that
zeroes it. On the 2-core VM these benchmarks run on, that cost ~0.35 ms per MB: 1-2.4 GB of fresh
pages per bf16 step, 6% (dense 0.3B) to 21% (a small MoE) of the step at 1,024 tokens.

``keep_freed_host_memory()`` tells glibc to serve every allocation from its heap (no private
mappings) and never to shrink the heap, so the next step reuses the pages the last one freed.
The price: the process keeps the memory of its largest step (plus some fragmentation) until it
exits: 0-0.3 GiB more peak memory at 1,024 tokens, and with lengths varying from 256 to 1,024 the
heap settled ~0.4 GiB above the first steps' peak after 12 steps (benchmarks/PROFILE.md, "Fresh
pages", has the measurements). The trainer applies it
on CPU unless ``dist_env.keep_host_memory: false``; it is the same as starting Python with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes


def keep_freed_host_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module docstring); False where the C
    library is not glibc (macOS, musl), which is then left as it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # NOTE: mallopt returns 1 on success; no mappings of its own means no threshold to reach.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
