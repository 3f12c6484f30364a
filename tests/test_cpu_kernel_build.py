"""Building and switching off the C++ CPU kernels (ernie45/kernels/build.py): each is compiled once
into the user's cache, atomically, and its environment switch set to 0 keeps torch's operator."""

from __future__ import annotations

import pytest

from ernie45.kernels import build, causal_attention, expert_rows

KERNELS = [(causal_attention, "ERNIE45_CPU_ATTENTION"), (expert_rows, "ERNIE45_CPU_EXPERTS")]

pytestmark = pytest.mark.skipif(
    not build.cpu_supports_avx512_bf16() or causal_attention.library() is None,
    reason="this CPU has no AVX512-BF16 (or no C++ compiler): the kernels cannot run here",
)


@pytest.mark.parametrize("kernel, switch", KERNELS, ids=lambda k: getattr(k, "__name__", k))
def test_switched_off_by_environment(monkeypatch, kernel, switch):
    monkeypatch.setenv(switch, "0")
    kernel.library.cache_clear()
    try:
        assert kernel.library() is None
    finally:
        monkeypatch.delenv(switch)
        kernel.library.cache_clear()
    assert kernel.library() is not None


@pytest.mark.parametrize("kernel, switch", KERNELS, ids=lambda k: getattr(k, "__name__", k))
def test_built_atomically_into_the_cache(monkeypatch, tmp_path, kernel, switch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel.library.cache_clear()
    try:
        assert kernel.library() is not None
        built = list((tmp_path / "ernie45" / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no partial file left behind
    finally:
        kernel.library.cache_clear()
