"""Build, cache and load the native CPU kernels' shared library (every kernels/csrc/*.cpp, one library) with the system C++
compiler, and check it against torch before it is used; kernels/native.py calls it from torch.

Build: ``$CXX`` (else c++ / g++) with OpenMP, no torch headers (about a second), linked against the OpenMP
runtime torch itself loaded (by path), so the kernels' loops run on torch's thread pool with its thread count
rather than on a second pool that would fight it for the cores. The shared library goes to
``$GOOSE_KERNEL_DIR`` (default ``$XDG_CACHE_HOME/goose/kernels`` or ``~/.cache/goose/kernels``) under a name
hashed from the source and the flags, written atomically, so concurrent processes and later runs share it and
a machine with a prebuilt library (the Docker image) needs no compiler. On x86-64 the hot functions are built
for several vector widths and picked at run time, so a library built on one machine runs on another.

``GOOSE_NATIVE_KERNELS``: ``auto`` (default: use them when they build), ``0`` (never), ``1`` (fail loudly when
they cannot be built). A library is checked against the torch step on a small input before it is used.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

__all__ = ["NativeUnavailable", "load", "mode", "ensure_loadable", "available", "status", "build_dir",
           "openmp_runtimes", "SOURCE", "SOURCES", "ABI_VERSION",
           "load_for_head_size"]

log = logging.getLogger("goose.kernels")

SOURCE = Path(__file__).with_name("csrc") / "rwkv7_cpu.cpp"
SOURCES = sorted(SOURCE.parent.glob("*.cpp"))   # one library from every file in csrc/ (the time mix is SOURCE)
HEADERS = sorted(SOURCE.parent.glob("*.h"))
ABI_VERSION = 8
_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-trapping-math"]
_OPENMP_NAME = re.compile(r"^lib(gomp|iomp5|omp)([-.].*)?\.so")


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here; the message says why (no compiler, build error, disabled)."""


class _Lib:
    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        lib.goose_abi_version.restype = ctypes.c_int
        lib.goose_max_head_size.restype = i64
        lib.goose_wkv7_seq.argtypes = [i64, i64, i64, i64] + [ptr] * 8
        lib.goose_wkv7_seq.restype = None
        lib.goose_rwkv7_time_mix.argtypes = [i64, i64, i64, i64, ctypes.c_int, ctypes.c_int] + [ptr] * 16 + [
            f32, f32, ptr, ptr]
        lib.goose_rwkv7_time_mix.restype = None
        self.abi = lib.goose_abi_version()
        self.max_head_size = lib.goose_max_head_size()
        self.wkv7_seq = lib.goose_wkv7_seq
        self.time_mix = lib.goose_rwkv7_time_mix
        lib.goose_sample_rows.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr]
        lib.goose_sample_rows.restype = None
        self.sample_rows = lib.goose_sample_rows
        lib.goose_apply_token_mask.argtypes = [i64, i64, ptr, i64, ptr, ptr, i64]
        lib.goose_apply_token_mask.restype = None
        self.apply_token_mask = lib.goose_apply_token_mask
        # decode_cpu.cpp: the layer's work between the big products (kernels/native_decode.py)
        lib.goose_residual_ln_mix.argtypes = [i64, i64, i64, i64, ptr, ptr, ctypes.c_int, ptr, ptr, f32, ptr, ptr,
                                              ctypes.c_int, ptr]
        lib.goose_residual_ln_mix.restype = None
        self.residual_ln_mix = lib.goose_residual_ln_mix
        lib.goose_lora_time_mix.argtypes = ([i64, i64, i64, ctypes.c_int] + [ptr] * 8 + [ctypes.c_int]
                                            + [ptr, ptr, i64] * 4 + [ptr] * 8 + [f32, f32, ptr, ctypes.c_int, ptr])
        lib.goose_lora_time_mix.restype = None
        self.lora_time_mix = lib.goose_lora_time_mix
        lib.goose_gemv.argtypes = [i64, i64, i64, ptr, ctypes.c_int, ptr, ctypes.c_int, ptr, ctypes.c_int]
        lib.goose_gemv.restype = None
        self.gemv = lib.goose_gemv
        lib.goose_packed_layouts_readable.restype = ctypes.c_int
        self.packed_layouts_readable = bool(lib.goose_packed_layouts_readable())
        lib.goose_decode_step.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr]
        lib.goose_decode_step.restype = ctypes.c_int
        self.decode_step = lib.goose_decode_step
        # quantized products (csrc/quant_cpu.cpp, called through kernels/quant_native.py)
        lib.goose_quant_matmul.argtypes = [i64, i64, i64, ctypes.c_int, i64, ptr, ctypes.c_int, i64, ptr, i64,
                                           ptr, ptr, ctypes.c_int, i64, ptr, ctypes.c_int, i64]
        lib.goose_quant_matmul.restype = ctypes.c_int
        self.quant_matmul = lib.goose_quant_matmul
        lib.goose_quant_dequantize.argtypes = [i64, i64, ctypes.c_int, i64, ptr, i64, ptr, ptr, ctypes.c_int, i64,
                                               ptr, ctypes.c_int, i64]
        lib.goose_quant_dequantize.restype = None
        self.quant_dequantize = lib.goose_quant_dequantize
        self._handle = lib


def build_dir() -> Path:
    if os.environ.get("GOOSE_KERNEL_DIR"):
        return Path(os.environ["GOOSE_KERNEL_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "goose" / "kernels"


def _flags() -> list[str]:
    flags = list(_FLAGS)
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-DGOOSE_X86_CLONES")
    return flags


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere). torch loads its own."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if _OPENMP_NAME.match(os.path.basename(path)) and path not in found:
            found.append(path)
    return found


def _torch_openmp() -> str | None:
    """The OpenMP runtime torch uses, to link against by path: its soname may be a wheel's private one
    (libgomp-<hash>.so.1), and a library that asked for the system's libgomp.so.1 instead would start a second
    thread pool next to torch's."""
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:
        log.warning("several OpenMP runtimes are loaded (%s): the native kernels link the system's with -fopenmp "
                    "and may run a second thread pool next to torch's", ", ".join(runtimes))
    return runtimes[0] if len(runtimes) == 1 else None


def _library_name() -> str:
    """Hash of what determines the binary: source, flags, OpenMP runtime, platform (not the compiler: a
    prebuilt library must load on a machine that has none)."""
    h = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        h.update(source.name.encode())
        h.update(source.read_bytes())
    h.update(" ".join(_flags()).encode())
    h.update(os.path.basename(_torch_openmp() or "-fopenmp").encode())
    h.update(f"{sys.platform}-{platform.machine()}".encode())
    return f"rwkv7_cpu-{h.hexdigest()[:16]}.so"


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++"):
        if cand and shutil.which(cand):
            return cand
    raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    objs = [f"{tmp[:-len('.so')]}.{source.stem}.o" for source in SOURCES]
    cxx, omp = _compiler(), _torch_openmp()
    link_omp = [omp, f"-Wl,-rpath,{os.path.dirname(omp)}"] if omp else ["-fopenmp"]
    steps = [(source, [cxx, *_flags(), "-c", str(source), "-o", obj]) for source, obj in zip(SOURCES, objs)]
    steps.append((SOURCE, [cxx, "-shared", *objs, *link_omp, "-o", tmp]))
    t0 = time.perf_counter()
    try:
        for source, cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise NativeUnavailable(f"building {source.name} failed ({' '.join(cmd)}):\n"
                                        f"{proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)             # mkstemp makes 0600: other users (a container's runtime uid) must load it
        os.replace(tmp, target)          # atomic: a concurrent build or load sees the old file or the whole new one
    except subprocess.TimeoutExpired:
        raise NativeUnavailable("building the native kernels took over 300 s; gave up") from None
    finally:
        for leftover in (tmp, *objs):
            if os.path.exists(leftover):
                os.unlink(leftover)
    log.info("built the native CPU kernels in %.1f s: %s", time.perf_counter() - t0, target)


def _self_test(lib: _Lib) -> None:
    """The library against torch on small inputs: the WKV recurrence at head sizes 16 and 64 in both layouts
    (one token, then a prompt's transposed walk), decode_cpu.cpp's calls, and the sampler's edge cases. A
    miscompiled kernel must never serve."""
    from kernels.wkv7_reference import wkv7_step_ as torch_step_
    g = torch.Generator().manual_seed(0)
    for N in (16, 64):
        B, T, H = 2, 6, 3
        r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
        w = -0.6 * torch.rand(B, T, H, N, generator=g)
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        a, b = -kk, kk * torch.rand(B, T, H, N, generator=g)
        state = torch.randn(B, H, N, N, generator=g)
        want_state = state.clone()
        want = torch.cat([torch_step_(*(x[:, t:t + 1] for x in (r, w, k, v, a, b)), want_state)
                          for t in range(T)], 1)
        got = torch.empty_like(r)
        for lo, hi in ((0, 1), (1, T)):   # one token (the decode layout), then five (the transposed prompt walk)
            part = [x[:, lo:hi].contiguous() for x in (r, w, k, v, a, b)]
            out = torch.empty_like(part[0])
            lib.wkv7_seq(B, hi - lo, H, N, *(t.data_ptr() for t in part), state.data_ptr(), out.data_ptr())
            got[:, lo:hi] = out
        err = max(((got - want).abs().max() / want.abs().max()).item(),
                  ((state - want_state).abs().max() / want_state.abs().max()).item())
        if not err < 1e-5:
            raise NativeUnavailable(f"{lib.path} gives wrong results (WKV, head size {N}: relative error "
                                    f"{err:.2e} against torch)")
    _self_test_decode(lib, g)
    logits = torch.full((3, 300), float("-inf"))
    logits[0, 123], logits[1, 7], logits[1, 299] = 0.0, 5.0, -30.0
    picked = torch.empty(3, dtype=torch.int64)
    inv_t, u = torch.ones(3), torch.full((3,), 0.5)        # named: a temporary's memory is freed before the call
    lib.sample_rows(3, 300, logits.data_ptr(), 300, inv_t.data_ptr(), u.data_ptr(), picked.data_ptr())
    if picked.tolist() != [123, 7, -1]:
        raise NativeUnavailable(f"{lib.path} gives wrong results (sampler: {picked.tolist()})")
    logits = torch.zeros(2, 70)
    bits = torch.tensor([[0x7FFFFFFF, 0, 0x1]], dtype=torch.int32)       # tokens 0..30 and 64 of row 1
    rows = torch.tensor([1])
    lib.apply_token_mask(1, 70, logits.data_ptr(), 70, rows.data_ptr(), bits.data_ptr(), 3)
    if not (torch.isfinite(logits[1]).nonzero().flatten().tolist() == [*range(31), 64] and bool(logits[0].eq(0).all())):
        raise NativeUnavailable(f"{lib.path} gives wrong results (token mask)")
    _self_test_quant(lib, g)


def _self_test_quant(lib: _Lib, g: torch.Generator) -> None:
    """The quantized product (int8, group 32, fp16 scales; 3 rows x 40 columns, so the vector body and the scalar
    tail both run) against the float product of its dequantized weight."""
    codes = torch.randint(-127, 128, (5, 40), generator=g, dtype=torch.int8)
    scales = torch.rand(5, 2, generator=g).half()
    x, y = torch.randn(3, 40, generator=g), torch.empty(3, 5)
    lib.quant_matmul(3, 5, 40, 8, 32, x.data_ptr(), 0, 40, codes.data_ptr(), 40, scales.data_ptr(), None, 2, 2,
                     y.data_ptr(), 0, 5)
    want = x @ (codes.float() * scales.float().repeat_interleave(32, 1)[:, :40]).t()
    if not torch.allclose(y, want, rtol=1e-4, atol=1e-3):
        raise NativeUnavailable(f"{lib.path} gives wrong results (quantized product)")


def _self_test_decode(lib: _Lib, g: torch.Generator) -> None:
    """decode_cpu.cpp against torch: the residual + layer norm + shift mix, and the LoRA chains of the LoRA + time
    mix call (its time mix is the one checked above; the in-context rate's factors are zero)."""
    F = torch.nn.functional
    B, C, H, N, D = 2, 64, 2, 32, 8
    x, dx, prev = torch.randn(B, 1, C, generator=g), torch.randn(B, 1, C, generator=g), torch.randn(B, C, generator=g)
    w, b, mix = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), torch.rand(2, C, generator=g)
    h = F.layer_norm(x + dx, (C,), w, b, 1e-5)
    want = h + (prev.unsqueeze(1) - h) * mix.view(2, 1, 1, C)
    out = torch.empty(2, B, 1, C)
    lib.residual_ln_mix(B, 1, C, 2, x.data_ptr(), dx.data_ptr(), 0, w.data_ptr(), b.data_ptr(), 1e-5, prev.data_ptr(),
                        mix.data_ptr(), 0, out.data_ptr())
    if not (torch.allclose(out, want, rtol=1e-5, atol=1e-5) and torch.allclose(prev, h[:, 0], atol=1e-5)):
        raise NativeUnavailable(f"{lib.path} gives wrong results (residual + layer norm + shift mix)")
    rows = [torch.randn(B, C, generator=g) for _ in range(7)]               # xw, xa, xg, xv, r, k, v
    w1, w2, g1, g2 = (torch.randn(*shape, generator=g) * 0.2 for shape in ((D, C), (C, D), (D, C), (C, D)))
    zeros = torch.zeros(D, C), torch.zeros(C, D)
    vecs = [torch.randn(C, generator=g) * 0.2 for _ in range(8)]
    outs, states = [], []
    for w_lora in (F.linear(torch.tanh(F.linear(rows[0], w1)), w2), None):
        state = torch.ones(B, H, N, N) * 0.1
        out = torch.empty(B, C)
        if w_lora is not None:       # the torch LoRA into the checked time mix, a_lora and g through their bases
            a_lora, g_row = torch.zeros(B, C), F.linear(torch.sigmoid(F.linear(rows[2], g1)), g2)
            lib.time_mix(B, 1, H, N, 0, 0, rows[4].data_ptr(), w_lora.data_ptr(), rows[5].data_ptr(),
                         rows[6].data_ptr(), a_lora.data_ptr(), None, None, g_row.data_ptr(),
                         *(v.data_ptr() for v in vecs[:2]), None, *(v.data_ptr() for v in vecs[3:]), 64e-5, -0.6,
                         state.data_ptr(), out.data_ptr())
        else:
            lib.lora_time_mix(B, H, N, 0, *(t.data_ptr() for t in rows), None, 0, w1.data_ptr(), w2.data_ptr(), D,
                              zeros[0].data_ptr(), zeros[1].data_ptr(), D, g1.data_ptr(), g2.data_ptr(), D,
                              None, None, 0, *(v.data_ptr() for v in vecs[:2]), None,
                              *(v.data_ptr() for v in vecs[3:]), 64e-5, -0.6, state.data_ptr(), 0, out.data_ptr())
        outs.append(out)
        states.append(state)
    if not (torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5) and torch.allclose(states[0], states[1], atol=1e-5)):
        raise NativeUnavailable(f"{lib.path} gives wrong results (LoRA chains + time mix)")


_lock = threading.Lock()
_loaded: _Lib | None = None
_failure: NativeUnavailable | None = None


def mode() -> str:
    mode = (os.environ.get("GOOSE_NATIVE_KERNELS") or "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"GOOSE_NATIVE_KERNELS must be auto, 0 or 1, got {mode!r}")
    return mode


def _open(path: Path) -> _Lib:
    lib = _Lib(path)
    if lib.abi != ABI_VERSION:
        raise NativeUnavailable(f"{path} reports ABI {lib.abi}, expected {ABI_VERSION}")
    _self_test(lib)
    return lib


def load() -> _Lib:
    """The loaded library, building it first if needed; raises NativeUnavailable (the reason) otherwise.
    The outcome is remembered for the process."""
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise _failure
        if mode() == "0":
            raise NativeUnavailable("disabled by GOOSE_NATIVE_KERNELS=0")
        try:
            path = build_dir() / _library_name()
            if not path.exists():
                _build(path)
                lib = _open(path)
            else:
                try:
                    lib = _open(path)
                except (NativeUnavailable, OSError) as exc:    # a damaged cache entry: build it again, once
                    log.warning("the cached native kernels %s are unusable (%s); rebuilding", path, exc)
                    fresh = path.with_name(f"{path.stem}.{os.getpid()}.so")   # a new name: dlopen caches by name
                    try:
                        _build(fresh)
                        lib = _open(fresh)
                        os.replace(fresh, path)
                        lib.path = path
                    finally:
                        if fresh.exists():
                            fresh.unlink()
        except NativeUnavailable as exc:
            _failure = exc
            raise
        except OSError as exc:            # unwritable cache directory, a library that does not load
            _failure = NativeUnavailable(f"native CPU kernels unavailable: {exc}")
            raise _failure from exc
        _loaded = lib
        return lib


def load_for_head_size(head_size: int) -> _Lib:
    """The library, for kernels that hold a head's state in fixed buffers: NativeUnavailable above their limit."""
    lib = load()
    if head_size > lib.max_head_size:
        raise NativeUnavailable(f"head size {head_size} is above the native kernel's limit {lib.max_head_size}")
    return lib


def ensure_loadable() -> None:
    """For kernels.get_wkv7: raise NativeUnavailable now rather than at the first call."""
    load()


def available() -> bool:
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def status() -> str:
    """One line for logs: where the library is, or why there is none."""
    try:
        return f"native CPU kernels: {load().path}"
    except NativeUnavailable as exc:
        return f"native CPU kernels unavailable: {exc}"


def _reset_for_tests() -> None:
    global _loaded, _failure
    with _lock:
        _loaded, _failure = None, None
