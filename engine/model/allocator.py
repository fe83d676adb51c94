"""Keep glibc's malloc from handing every large temporary back to the kernel.

A forward pass allocates and frees many tensors of a few MB (prefill intermediates, the chunked WKV's
[B, H, n, L, N] blocks, decode-time [B, V] logits). glibc serves blocks above its mmap threshold (128 KiB,
raised adaptively) with fresh mmap()s and returns them on free(), so the next forward page-faults and zeroes
that memory again: ~170-280 thousand page faults per 1024-token prefill of the 0.1B model here, and prefill
ran ~680-830 tok/s in bf16 instead of ~900-990 without them (same machine, alternating runs). Servers built
on torch usually swap in jemalloc or tcmalloc for this; glibc's own knobs (the MALLOC_*_ environment
variables, or mallopt at run time) do the same job with nothing to install:

- M_MMAP_THRESHOLD 32 MiB (glibc's maximum on 64-bit): blocks up to that size come from the heap;
- M_TRIM_THRESHOLD 1 GiB and M_TOP_PAD 64 MiB: freed heap memory stays mapped for the next step.

The cost is that the process keeps its high-water mark of temporaries instead of returning it between
requests, which a server wants anyway. ``goose serve`` and the benchmarks call ``tune_malloc()`` at start;
``GOOSE_MALLOC_TUNE=0`` leaves malloc alone. Elsewhere (musl, macOS, Windows) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("goose.engine")

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3        # glibc's mallopt parameter numbers
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))


def tune_malloc(env=os.environ) -> bool:
    """Apply SETTINGS through glibc's mallopt; True when every one was accepted."""
    if env.get("GOOSE_MALLOC_TUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    if not ok:
        log.warning("glibc mallopt refused part of the allocator settings; large temporaries may page-fault")
    return ok


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc malloc_trim), once after loading a model: quantizing
    at load frees many float temporaries of a few MB that would otherwise stay resident (cpu bf16i8 on the
    0.1B shape: +709 MB of anonymous memory after load without it, +237 MB with it, for 258 MB of weights)."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def _glibc(name: str):
    """glibc's function ``name``, or None elsewhere (musl has no mallopt nor malloc_trim; macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


MADV_PAGEOUT = 21                   # Linux >= 5.4: reclaim these pages now; their contents are always kept


def release_pages(t) -> bool:
    """Ask the kernel to reclaim the memory pages wholly inside CPU tensor ``t``, once this process no longer
    reads it: a memory-mapped checkpoint's float matrix after it is quantized at load. Its pages are otherwise
    resident until the whole mapping is released at the end of loading, so a 2.9B bf16 checkpoint loaded as
    `cpu bf16i8` peaked at its 5.7 GB file plus the 3 GB model. MADV_PAGEOUT never loses data: file-backed pages
    are read again if touched, and anonymous ones stay where there is no swap; elsewhere this does nothing."""
    madvise = _glibc("madvise")
    if madvise is None or t.device.type != "cpu" or not t.numel():
        return False
    import mmap
    start = t.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return False
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise(first, last - first, MADV_PAGEOUT) == 0
