"""Row scatter with streaming stores: ``dst[place[i]] = src[i]`` for every row ``i`` (``docs/store-format.md``).

The loader shuffles a window by *scattering* each chunk's rows to their places in the window's
batch order, not by gathering each batch's rows from the chunks. Both move every byte once, but
they differ in which side is random. A gather reads rows at random: each 2 KiB row is a fresh DRAM
access behind a TLB miss (a two-level walk in a VM), ~500 ns a row on the bench VM, 4× a
sequential copy. A scatter reads each chunk sequentially and writes rows at random; with
non-temporal ("streaming") stores whole rows go to memory as full cache lines, with no
read-for-ownership, and the stores do not wait on each other. Measured on the bench's 512 MiB
window (d = 512 float32): gather 130–165 ms, plain scatter 95 ms, streaming scatter 34 ms on one
thread and 19–25 ms on two (``bench/README.md``, Store).

:func:`scatter_rows` takes the streaming path (one cache line a store) when numba is importable,
the destination is 64-byte aligned and a row is a multiple of 64 bytes (any d that is a multiple of
16 in float32 or 32 in float16: 512, 576, 768, 896, 1600, 2304, 4096, ...); otherwise it falls
back to numpy's ``dst[place] = src``. Both give the same bytes (tested). 16-byte streaming stores
for other row sizes measured 25 ms against 19 ms on two threads; not worth a second kernel. Rows written with streaming stores are not in the cache afterwards, which is
what a window far larger than the cache wants. :func:`aligned_empty` allocates destinations the
fast path accepts.
"""

from __future__ import annotations

import atexit
import os
import threading

import numpy as np

try:  # numba is a dependency, but a missing or broken install must only cost speed
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

#: The streaming path is on when numba imports and ``DYNSAE_STREAMING_SCATTER`` is not "0".
ENABLED = numba is not None and os.environ.get("DYNSAE_STREAMING_SCATTER", "1") != "0"
ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


if numba is not None:

    @intrinsic
    def _store64(typingctx, dst, dst_byte, src, src_byte):
        """``store(dst, dst_byte, src, src_byte)``: 64 bytes (one cache line) from ``src``'s data at
        byte ``src_byte`` to ``dst``'s at ``dst_byte`` (a 64-byte aligned address), one non-temporal store."""
        def codegen(context, builder, signature, args):
            d = context.make_array(signature.args[0])(context, builder, args[0])
            s = context.make_array(signature.args[2])(context, builder, args[2])
            byte = ir.IntType(8).as_pointer()
            line = ir.VectorType(ir.IntType(64), 8).as_pointer()
            dp = builder.bitcast(builder.gep(builder.bitcast(d.data, byte), [args[1]]), line)
            sp = builder.bitcast(builder.gep(builder.bitcast(s.data, byte), [args[3]]), line)
            st = builder.store(builder.load(sp, align=1), dp, align=64)
            st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            return context.get_dummy_value()

        return types.void(dst, dst_byte, src, src_byte), codegen

    @intrinsic
    def _store_fence(typingctx):
        """A full fence: streaming stores are weakly ordered, and other threads read the rows next."""
        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()

        return types.void(), codegen

    @numba.njit(nogil=True, cache=True)
    def _scatter64(src, dst, place):  # src, dst: (rows, row bytes) uint8; row bytes % 64 == 0
        nb = src.shape[1]
        for r in range(src.shape[0]):
            d0, s0 = place[r] * nb, r * nb
            for o in range(0, nb, 64):
                _store64(dst, d0 + o, src, s0 + o)
        _store_fence()


_ready = threading.Event()
_start_lock = threading.Lock()
_loader: list[threading.Thread] = []

#: Bytes a process scatters through numpy's assignment before :func:`scatter_rows` starts loading the
#: streaming kernel. Loading it costs ~0.45 s of one core (numba's dispatcher and the cached code, bench
#: VM), about what numpy's path loses against it over ~2.6 GiB (120 against 34 ms per 512 MiB on one
#: thread), so a process that reads little — an evaluation pass, a fresh loader's first epoch over
#: 512 MiB or 1 GiB (0.17× → 0.26× a raw read without the load, bench/README) — never pays for it, and a
#: long stream has it from its third GiB on.
LOAD_AFTER_BYTES = 2 << 30
_scattered = [0]  # bytes this process scattered before the kernel was ready (threads may race: a count)


def _load_kernel() -> None:
    try:
        _scatter64(np.zeros((1, ALIGN), np.uint8), aligned_empty((1, ALIGN), np.uint8), np.zeros(1, np.int64))
    except Exception:  # noqa: BLE001 - a broken numba install only costs speed: numpy's path stays
        return
    _ready.set()


def kernel_ready(timeout: float | None = 0) -> bool:
    """Whether the streaming kernel is loaded, waiting up to ``timeout`` seconds (None: until it is).

    The first call starts loading it (from numba's on-disk cache; ~0.45 s of one core on the bench
    VM, once per process) in a background thread, so no scatter waits for it: until it is ready,
    :func:`scatter_rows` takes numpy's path (the same bytes). :func:`scatter_rows` makes that first
    call once the process has scattered :data:`LOAD_AFTER_BYTES`; call it yourself to have the kernel
    sooner (``dynsae kernels``, a benchmark's warm-up)."""
    if not ENABLED:
        return False
    if not _ready.is_set() and not _loader:
        with _start_lock:
            if not _loader:
                _loader.append(threading.Thread(target=_load_kernel, daemon=True, name="scatter-kernel-load"))
                _loader[0].start()
                atexit.register(_loader[0].join)  # never leave LLVM working while the interpreter exits
    return _ready.wait(timeout)


def scatter_rows(src: np.ndarray, dst: np.ndarray, place: np.ndarray) -> None:
    """``dst[place[i]] = src[i]`` for every row ``i`` (rows along axis 0; same dtype and row shape).

    ``place`` holds distinct indices into ``dst``'s rows (their range is checked: the fast path writes
    through raw addresses). Releases the GIL on the streaming path, so threads scatter in parallel.
    Until the kernel is loaded (:func:`kernel_ready`; started once the process has scattered
    :data:`LOAD_AFTER_BYTES`) rows go through numpy's assignment.
    """
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:] or src.shape[0] != place.shape[0]:
        raise ValueError(f"scatter_rows: src {src.shape} {src.dtype}, dst {dst.shape} {dst.dtype} and "
                         f"{place.shape[0]} places do not match")
    n = src.shape[0]
    if n == 0:
        return
    place = np.ascontiguousarray(place, dtype=np.int64)
    if int(place.min()) < 0 or int(place.max()) >= dst.shape[0]:
        raise IndexError(f"scatter_rows: places must lie in 0..{dst.shape[0] - 1}")
    row_bytes = src.dtype.itemsize * (src.size // n)
    if (ENABLED and row_bytes % ALIGN == 0 and dst.ctypes.data % ALIGN == 0 and dst.flags.c_contiguous
            and src.flags.c_contiguous and (_ready.is_set() or _kernel_worth_loading(n * row_bytes))):
        _scatter64(src.reshape(n, -1).view(np.uint8), dst.reshape(dst.shape[0], -1).view(np.uint8), place)
        return
    dst[place] = src


def _kernel_worth_loading(nbytes: int) -> bool:
    """Count ``nbytes`` scattered without the kernel; once :data:`LOAD_AFTER_BYTES` are counted, start
    loading it, and say whether it is ready."""
    _scattered[0] += nbytes
    return _scattered[0] >= LOAD_AFTER_BYTES and kernel_ready(timeout=0)
