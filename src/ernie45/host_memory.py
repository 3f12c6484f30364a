"""Keep freed host memory in the process for reuse (CPU, Linux/glibc): the CPU's caching allocator.

glibc hands large freed blocks back to the operating system: anything it mapped on its own (blocks
of 32 MB and more) and free memory at the top of its heap. Training steps, forwards and generate
calls free and allocate the same sizes call after call (logits, activations, oneDNN's packed copy
of each weight, gradients), so each call then writes into freshly mapped pages, and the first touch
of each 4 KB page is a page fault that zeroes it: ~0.35 ms per MB on the 2-core VM the benchmarks
run on, 6-21% of a bf16 training step and ~10% of a forward (benchmarks/PROFILE.md, "Fresh pages"
and "Inference pays fresh pages too").

``keep_freed_host_memory()`` tells glibc to serve every allocation from its heap (no private
mappings) and never to shrink the heap, so the next call reuses the pages the last one freed: what
torch's caching allocator does for GPU memory. The price is the same too: the process keeps the
memory of its largest call (plus some fragmentation) until ``release_host_memory()`` (the
counterpart of ``torch.cuda.empty_cache()``) or exit.

Who turns it on: the trainer on CPU (``dist_env.keep_host_memory``, on unless the recipe says
false) and, failing an earlier choice, the first forward of an ernie45 model on CPU
(``keep_host_memory_by_default``). ``ERNIE45_KEEP_HOST_MEMORY=0`` in the environment, or a recipe's
``false``, leaves glibc's defaults for the whole process. Keeping it is the same as starting
Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.

Memory that is filled once and kept (a loaded checkpoint's stacked experts, weights cast on load)
cannot reuse anything: ``empty_in_huge_pages`` asks Linux to back it with 2 MB transparent huge
pages instead, one page fault per 2 MB instead of per 4 KB.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys

import torch

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes
HUGE_PAGE_BYTES = 2 * 1024 * 1024  # a transparent huge page on x86-64 and most aarch64 kernels
LINUX_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # for madvise, whatever the C library
OPT_OUT = "ERNIE45_KEEP_HOST_MEMORY"  # "0" / "false" / "no" / "off": glibc's defaults in this process
_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

_decided: bool | None = None  # this process's choice, once made: True kept, False glibc's defaults


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module docstring); False where the C
    library is not glibc (macOS, musl), which is then left as it is."""
    global _decided
    _decided = True
    libc = _glibc()
    if libc is None:
        return False
    # NOTE: mallopt returns 1 on success; no mappings of its own means no threshold to reach.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def leave_host_memory_alone() -> None:
    """Keep glibc's defaults for the rest of the process (a recipe's ``keep_host_memory: false``; the
    trainer decides before its first forward). NOTE: it cannot undo an earlier keep: ``mallopt``
    settings switch off glibc's own adaptive thresholds for good."""
    global _decided
    _decided = False


def keep_host_memory_by_default() -> None:
    """Keep freed memory unless this process chose already or the environment opts out; called by
    every CPU forward, so after the first call it is one global read."""
    if _decided is not None:
        return
    setting = os.environ.get(OPT_OUT, "1").strip().lower()
    if setting not in _SWITCH:
        raise ValueError(f"{OPT_OUT}={os.environ[OPT_OUT]!r} is not a switch: set it to 1 (keep freed host memory) or 0")
    if _SWITCH[setting]:
        keep_freed_host_memory()
    else:
        leave_host_memory_alone()


def release_host_memory() -> bool:
    """Hand the heap's free pages back to the OS now (``malloc_trim``); memory in use stays.
    False where the C library is not glibc or nothing could be released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def empty_in_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype)`` on the CPU, its whole 2 MB pages advised to be transparent huge
    pages (Linux ``MADV_HUGEPAGE``), for a tensor about to be written whole and kept. The first write
    to fresh memory faults once per page; with huge pages that is 512x fewer faults (a mini-MoE's
    stacked experts load 1.5-1.9x faster, benchmarks/PROFILE.md). Memory the heap had already touched
    keeps its pages; off Linux, or where the kernel has no huge pages, this is plain ``torch.empty``."""
    out = torch.empty(shape, dtype=dtype)
    start = -(-out.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    stop = (out.data_ptr() + out.numel() * out.element_size()) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if LINUX_LIBC is not None and hasattr(mmap, "MADV_HUGEPAGE") and start < stop:
        LINUX_LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), mmap.MADV_HUGEPAGE)
    return out
