"""Building and loading ernie45's C++ CPU kernels (one ``.cpp`` file each, for AVX512-BF16 CPUs).

Each kernel is plain C++ with no torch headers: it is compiled on first use with the system's C++
compiler (about 2 s) into a per-user cache, named by a digest of its source, the shared headers and
the compiler command, and called through ctypes with raw pointers. It is built with ``-fopenmp``:
loaded into a torch process, it shares torch's OpenMP runtime (``libgomp.so.1``) and so its threads
(``common.h``). Where it cannot run (another CPU, no compiler, a failed build, its environment
switch set to 0), ``load`` gives None with one log line and callers use torch's own operator.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"}


@functools.cache
def cpu_supports_avx512_bf16() -> bool:
    """True on Linux x86-64 when /proc/cpuinfo lists every instruction set the kernels use."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return CPU_FLAGS <= set(flags)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ernie45" / "kernels"


def compile_library(compiler: str, source: Path, target: Path) -> None:
    """Compile ``source`` into ``target`` atomically (a temporary file renamed into place), so that
    processes building at the same time never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, "-o", partial, str(source)], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def load(source_name: str, switch: str, what: str, fallback: str) -> ctypes.CDLL | None:
    """The compiled kernel ``source_name`` (a ``.cpp`` file next to this one), or None where it
    cannot run here, with one log line naming ``what`` is off, why, and the ``fallback`` used
    instead. ``switch`` is the environment variable that turns it off when set to 0."""
    if os.environ.get(switch, "1") == "0":
        return None
    if not cpu_supports_avx512_bf16():
        log.debug("%s off: this CPU has no AVX512-BF16", what)
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("%s off: no C++ compiler (g++) found; using %s", what, fallback)
        return None
    source = HERE / source_name
    text = source.read_bytes() + b"".join(header.read_bytes() for header in sorted(HERE.glob("*.h")))
    digest = hashlib.sha256(text + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}_{digest}.so"
    try:
        if not target.exists():
            compile_library(compiler, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.warning("%s off: building %s failed (%s); using %s", what, target, detail.strip()[:300], fallback)
        return None
