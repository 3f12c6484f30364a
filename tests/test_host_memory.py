"""Freed host memory is kept for reuse on CPU (ernie45/host_memory.py): measured by the page faults
of a fresh process; turned on by the trainer (``dist_env.keep_host_memory``) or else by a model's
first CPU forward, off with ``ERNIE45_KEEP_HOST_MEMORY=0``; ``release_host_memory`` gives it back."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from ernie45.training import runtime
from ernie45.training.config import ConfigError, DistEnvConfig
from ernie45 import host_memory
from ernie45.host_memory import keep_freed_host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Training steps in miniature: a 64 MB tensor written and freed, twelve times over; the page faults
# of each. Before them, per mode: "keep" asks for kept memory, "forward" runs a tiny model's forward
# on CPU.
FAULTS_PER_STEP = textwrap.dedent(
    """
    import json, resource, sys, torch
    from transformers import Ernie4_5Config
    import ernie45
    from ernie45.host_memory import keep_freed_host_memory
    kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
    if sys.argv[1] == "forward":
        config = Ernie4_5Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        with torch.no_grad():
            ernie45.from_config(config).eval()(torch.arange(8)[None])
    faults = []
    for step in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"kept": kept, "faults": faults}))
    """
)


def faults_per_step(*runs: tuple[str, dict[str, str]]) -> list[dict]:
    """Each (mode, extra environment) in a fresh process of its own, all started at once (a process's
    page faults are its own; most of each run is importing torch)."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != host_memory.OPT_OUT}
    processes = [
        subprocess.Popen([sys.executable, "-c", FAULTS_PER_STEP, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=inherited | env)  # fmt: skip
        for mode, env in runs
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only (elsewhere keep_freed_host_memory is a no-op)")
def test_kept_host_memory_is_reused_instead_of_faulted_in_again():
    """glibc returns every freed 64 MB block to the OS, so each step faults its 16k pages in again;
    told to keep freed memory, the heap settles within a few steps and the later ones fault none.

    NOTE: the heap can grow by a whole block on several of the first steps before the freed blocks
    fit (small allocations between steps split them): seen on steps 1-4 over 30 runs, and once on
    the fifth of six steps in a suite run. Once it fits it stays settled, so the last four of twelve
    steps are checked.
    """
    system, kept = faults_per_step(("system", {}), ("keep", {}))
    assert kept["kept"] is True
    assert min(system["faults"]) > 15_000  # 64 MB of 4 KB pages, all fresh, every step
    assert max(kept["faults"][-4:]) < 1_000, kept["faults"]


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_cpu_forward_keeps_host_memory_unless_the_environment_opts_out():
    """With no choice made before it, the first CPU forward keeps freed memory (later calls reuse
    it); ERNIE45_KEEP_HOST_MEMORY=0 leaves glibc's defaults."""
    kept, opted_out = faults_per_step(("forward", {}), ("forward", {"ERNIE45_KEEP_HOST_MEMORY": "0"}))
    assert max(kept["faults"][-4:]) < 1_000, kept["faults"]
    assert min(opted_out["faults"]) > 15_000, opted_out["faults"]


@pytest.mark.parametrize(
    ("earlier_choice", "environment", "kept"),
    [(None, None, True), (None, "false", False), ("recipe-off", None, False), ("trainer-keeps", "0", True)],
)
def test_the_first_choice_of_a_process_holds(monkeypatch, earlier_choice, environment, kept):
    """A forward keeps freed memory only when nothing chose before it: a recipe's keep_host_memory
    false (or the trainer's keeping it) stands, and the environment can opt out."""
    calls = []
    monkeypatch.setattr(host_memory, "_decided", None)
    monkeypatch.setattr(host_memory, "_glibc", lambda: calls.append("mallopt") and None)
    if environment is None:
        monkeypatch.delenv(host_memory.OPT_OUT, raising=False)
    else:
        monkeypatch.setenv(host_memory.OPT_OUT, environment)
    if earlier_choice == "recipe-off":
        host_memory.leave_host_memory_alone()
    elif earlier_choice == "trainer-keeps":
        host_memory.keep_freed_host_memory()
    host_memory.keep_host_memory_by_default()
    host_memory.keep_host_memory_by_default()
    assert host_memory._decided is kept
    assert len(calls) == (1 if kept else 0)


def test_an_unreadable_opt_out_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(host_memory, "_decided", None)
    monkeypatch.setenv(host_memory.OPT_OUT, "maybe")
    with pytest.raises(ValueError, match="ERNIE45_KEEP_HOST_MEMORY='maybe' is not a switch: set it to 1"):
        host_memory.keep_host_memory_by_default()


RELEASE = textwrap.dedent(
    """
    import json, os, torch
    from ernie45.host_memory import keep_freed_host_memory, release_host_memory
    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    keep_freed_host_memory()
    torch.ones(64 * 2**20)  # 256 MB written, then freed: kept in the heap
    kept = resident_mb()
    released = release_host_memory()
    print(json.dumps({"kept": kept, "released": released, "after": resident_mb()}))
    """
)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_release_host_memory_hands_the_kept_pages_back():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True)
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    assert sizes["released"] is True
    assert sizes["kept"] - sizes["after"] > 200, sizes


@pytest.mark.skipif(GLIBC, reason="non-glibc platforms only")
def test_elsewhere_keeping_host_memory_is_a_no_op():
    assert keep_freed_host_memory() is False


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_host_memory_unless_the_recipe_turns_it_off(monkeypatch, keep):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_host_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(runtime, "leave_host_memory_alone", lambda: calls.append(False))
    threads = torch.get_num_threads()
    try:
        runtime.init_runtime(DistEnvConfig(keep_host_memory=keep))
    finally:
        torch.set_num_threads(threads)
    assert calls == [keep]


def test_keep_host_memory_is_on_by_default_and_refuses_a_non_boolean():
    assert DistEnvConfig().keep_host_memory is True
    with pytest.raises((ConfigError, ValueError), match="keep_host_memory"):
        DistEnvConfig(keep_host_memory="sometimes")


def _transparent_huge_pages() -> str | None:
    """The kernel's THP mode ("always", "madvise", "never"), None where it has none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping of this process that holds ``address``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, stop = (int(part, 16) for part in head.split("-"))
                inside = start <= address < stop
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(_transparent_huge_pages() in (None, "never"), reason="the kernel has no transparent huge pages to ask for")
def test_empty_in_huge_pages_asks_for_huge_pages_and_is_an_ordinary_tensor():
    """``madvise(MADV_HUGEPAGE)`` marks the mapping "hg"; the tensor itself is torch.empty's."""
    tensor = host_memory.empty_in_huge_pages((3, 4 * 2**20), torch.bfloat16)  # 24 MB
    assert tensor.shape == (3, 4 * 2**20) and tensor.dtype == torch.bfloat16 and tensor.is_contiguous()
    middle = tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2
    assert "hg" in _vm_flags(middle)
    tensor.fill_(1.5)
    assert tensor.sum(dtype=torch.float64).item() == 1.5 * tensor.numel()


def test_empty_in_huge_pages_of_a_small_or_empty_tensor_is_plain_empty():
    for shape in [(0, 8), (3,), (1000, 10)]:
        tensor = host_memory.empty_in_huge_pages(shape, torch.float32)
        assert tensor.shape == shape and tensor.dtype == torch.float32
