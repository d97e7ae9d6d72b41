"""store.scatter: the streaming row scatter gives exactly numpy's ``dst[place] = src``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import scatter
from store.scatter import aligned_empty, scatter_rows


def test_the_streaming_path_is_on():
    assert scatter.ENABLED, "numba is a dependency: the fast path must be what the tests exercise"
    assert scatter.kernel_ready(timeout=None), "the kernel loads (numpy's path is taken only until then)"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), extra=st.integers(0, 50), width=st.sampled_from([(), (1,), (4,), (16,), (24,), (512,), (3, 8)]),
       dtype=st.sampled_from(["float32", "float16", "int64", "uint8"]), skew=st.sampled_from([0, 8, 16, 32]),
       seed=st.integers(0, 2**16), readonly=st.booleans())
def test_scatter_equals_numpy_fancy_assignment(n, extra, width, dtype, skew, seed, readonly):
    """Any row size (a multiple of 16 or 64 bytes takes a streaming kernel, others numpy), any dst
    alignment (skew bytes off a 64-byte boundary), read-only sources (memory-mapped chunks)."""
    assert scatter.kernel_ready(timeout=None)  # the kernel, not numpy's path while it loads
    rng = np.random.default_rng(seed)
    rows = n + extra
    src = (rng.standard_normal((n,) + width) * 100).astype(dtype)
    src.setflags(write=not readonly)
    place = rng.permutation(rows)[:n]
    row_bytes = int(np.prod(width, dtype=np.int64)) * np.dtype(dtype).itemsize
    backing = aligned_empty((rows * row_bytes + skew,), np.uint8)
    dst = backing[skew:].view(dtype).reshape((rows,) + width)
    dst[...] = rng.integers(0, 100, dst.shape).astype(dtype)
    expect = dst.copy()
    expect[place] = src
    scatter_rows(src, dst, place)
    assert np.array_equal(dst.view(np.uint8), expect.view(np.uint8))


def test_aligned_empty_is_64_byte_aligned():
    for shape, dtype in [((3, 5), "float16"), ((1000, 768), "float32"), ((7,), "int64"), ((2048, 1024), "float16")]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == np.dtype(dtype) and a.ctypes.data % 64 == 0 and a.flags.c_contiguous
        a[-1] = 3
        assert a.flags.writeable and a[-1].sum() == 3 * a[-1].size


def test_bad_places_and_shapes_are_refused_before_any_write():
    dst = aligned_empty((4, 16), "float32")
    dst[...] = 7
    src = np.ones((2, 16), np.float32)
    with pytest.raises(IndexError, match="places must lie in 0..3"):
        scatter_rows(src, dst, np.array([1, 4]))
    with pytest.raises(IndexError):
        scatter_rows(src, dst, np.array([-1, 2]))
    with pytest.raises(ValueError, match="do not match"):
        scatter_rows(src.astype(np.float16), dst, np.array([0, 1]))
    assert np.all(dst == 7)


def test_a_process_loads_the_kernel_only_once_it_has_scattered_enough():
    """A process that scatters less than LOAD_AFTER_BYTES never starts loading the kernel (numpy's path,
    the same bytes); the scatter that reaches it starts the load, and the kernel is then taken. A new
    process, so that no earlier test has loaded the kernel already."""
    code = textwrap.dedent("""
        import numpy as np
        from store import scatter
        scatter.LOAD_AFTER_BYTES = 1 << 20
        rng = np.random.default_rng(0)
        src = rng.standard_normal((1024, 128)).astype(np.float32)  # 512 KiB
        place = rng.permutation(1024)
        for _ in range(2):
            dst = scatter.aligned_empty((1024, 128), np.float32)
            scatter.scatter_rows(src, dst, place)
            print(bool(scatter._loader), bool(np.array_equal(dst[place], src)))
        print(scatter.kernel_ready(None))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split("\n")
    assert out[:3] == ["False True", "True True", "True"]
