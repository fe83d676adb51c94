"""Engine benchmark: Goose vs the official rwkv==0.8.32 package on one random 0.1B-shaped checkpoint, same run.

    python -m bench.engine [--dtypes fp32,bf16] [--quant fp32i8,bf16i8,fp32i4,bf16i4] [--prefill 1024]
                           [--decode 32] [--batch 64]
    python -m bench.engine --device cuda [bench/gpu.py's options]     # the GPU benchmark, bench/gpu.py

Prints prefill tokens/s (T=1024), single-stream decode tokens/s, and Goose's batched decode (aggregate
tokens/s at B=64) with each figure's ratio to the reference. Targets: prefill >= 5x, single-stream decode
>= 1.0x, B=64 aggregate >= 20x the reference's single stream. When llama-cpp-python is installed, a llama.cpp
column runs the same checkpoint exported by `goose convert` to GGUF (F32 for fp32, BF16/F16 for bf16/fp16).

A second table puts the quantized strategies (--quant) beside the float strategy with the same activation dtype,
all Goose in the same run, with each single-stream decode's weight-read bound: the bytes of weights one token
reads (every matrix once, one embedding row) divided by this machine's read bandwidth (measured once, after the
contenders). With llama-cpp-python, llama.cpp runs the same checkpoint there too: F32/BF16 GGUF beside the float
rows, Q8_0 (goose convert --dtype q8_0) beside the i8 rows and Q4_0 (llama.cpp's own quantizer,
llama_model_quantize on the F32 GGUF, its default Q4_0 recipe) beside the i4 rows, each with its own bound
(its GGUF's tensor bytes per token).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402

from bench.machine import machine_line  # noqa: E402, F401 (re-exported for the other benchmarks)
from engine import load_model  # noqa: E402
from bench.random_checkpoint import SHAPE_0B1, write_checkpoint  # noqa: E402
from engine.model.allocator import tune_malloc  # noqa: E402
from engine.model.threads import call_in_new_thread  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_reference(stem: str, dtype: str, T: int, n_decode: int, repeats: int) -> dict:
    from rwkv.model import RWKV
    model = RWKV(stem, f"cpu {dtype}")
    prompt = [(i * 7919) % 65536 for i in range(T)]
    prefill = timed(lambda: model.forward(prompt, None), repeats)
    _, state = model.forward(prompt[:8], None)

    def decode():
        nonlocal state
        for i in range(n_decode):
            _, state = model.forward([100 + i], state)
    return {"prefill": T / prefill, "decode": n_decode / timed(decode, repeats)}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a single-stream decode step reads: every matrix (quantized or float) once, plus one
    embedding row; vectors are counted too (they are tiny)."""
    def nbytes(t) -> int:
        if t is None:
            return 0
        if isinstance(t, tuple):                    # a LoRA (plain, prepared) pair: one of them is read
            return nbytes(t[0])
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        return t.nbytes                             # a quantized weight (engine/model/quant.py)
    layers = sum(nbytes(v) for lw in model.layers for v in vars(lw).values())
    return layers + nbytes(model.head) + model.emb[0].nbytes


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second this process reads from memory: a sum over a buffer far larger than the caches."""
    buf = torch.ones(megabytes << 18)               # fp32: megabytes MiB
    return buf.nbytes / timed(lambda: buf.sum(), repeats)


def bench_goose(path: str, dtype: str, T: int, n_decode: int, batch: int, repeats: int) -> dict:
    model = load_model(path, f"cpu {dtype}")
    prompt = torch.tensor([[(i * 7919) % 65536 for i in range(T)]])
    prefill = timed(lambda: model.forward(prompt, None), repeats)
    results = {"prefill": T / prefill, "kernels": f"linear {model.linear_backend}, decode {model.decode_kernel}",
               "weight_bytes": weight_bytes_per_token(model)}
    for B, key in ((1, "decode"), (batch, "batched")):
        _, state = model.forward(prompt[:, :8].expand(B, 8).contiguous(), None)
        toks = torch.arange(B).view(B, 1) + 100
        steps = n_decode if B == 1 else max(4, n_decode // 4)

        def decode():
            for _ in range(steps):
                model.forward(toks, state)
        results[key] = B * steps / timed(decode, repeats)
    return results


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def bench_llamacpp(gguf_path: str, T: int, n_decode: int, repeats: int) -> dict:
    """llama.cpp through llama-cpp-python on the GGUF export: prefill of T tokens, then one token per eval call."""
    from llama_cpp import Llama
    threads = torch.get_num_threads()
    llm = Llama(model_path=gguf_path, n_ctx=T + n_decode * (repeats + 2) + 64, n_batch=T, n_ubatch=min(T, 512),
                n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    prompt = [(i * 7919) % 65536 for i in range(T)]

    def prefill():
        llm.reset()
        llm.eval(prompt)
    results = {"prefill": T / timed(prefill, repeats)}
    llm.reset()
    llm.eval(prompt[:8])

    def decode():
        for i in range(n_decode):
            llm.eval([100 + i])
    results["decode"] = n_decode / timed(decode, repeats)
    llm.close()
    return results


def export_gguf(pth: str, dtype: str) -> str:
    from engine.formats.convert import convert
    path = pth.replace(".pth", f"-{dtype}.gguf")
    convert(pth, path, dtype=dtype, tokenizer="world", force=True, progress=False, note=lambda text: None)
    return path


QUANT_GGUF = {"i8": ("Q8_0", "goose convert --dtype q8_0"), "i4": ("Q4_0", "goose convert --dtype q4_0")}


def export_quantized_gguf(pth: str, kind: str) -> str:
    """The GGUF llama.cpp runs beside a quantized strategy: the same checkpoint as Q8_0 (i8) or Q4_0 (i4), every
    matrix in that type as the strategy quantizes every big matrix (llama.cpp's own quantizer would keep the
    head in Q6_K)."""
    return export_gguf(pth, "q8_0" if kind == "i8" else "q4_0")


def gguf_bytes_per_token(path: str) -> tuple[int, str]:
    """(bytes of a GGUF's tensors one decode step reads: all but the embedding, plus one embedding row; the
    tensor types of its matrices, e.g. "Q4_0 x72, Q6_K x1")."""
    from collections import Counter

    import gguf
    total, types = 0, Counter()
    for t in gguf.GGUFReader(path).tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            n //= int(t.shape[-1])                  # one row of [n_vocab, n_embd] (GGUF lists dims reversed)
        total += n
        if len(t.shape) == 2 and min(int(d) for d in t.shape) > 1:
            types[t.tensor_type.name] += 1
    return total, ", ".join(f"{name} x{n}" for name, n in types.most_common())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="cpu")
    known, rest = device.parse_known_args(argv)
    if known.device != "cpu":                       # the GPU benchmark of issue #17 (bench/gpu.py)
        from bench.gpu import main as gpu_main
        return gpu_main(["--device", known.device, *rest])
    ap = argparse.ArgumentParser(prog="goose bench engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (this benchmark), or cuda / cuda:N: bench/gpu.py's "
                    "prefill and decode of 0.1B/1.5B/7.2B shapes (its own options: --shapes, --dtype, ...)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--quant", default="fp32i8,bf16i8,fp32i4,bf16i4",
                    help="quantized strategies, Goose only, beside the float one with their activation dtype "
                         "('' for none)")
    ap.add_argument("--prefill", type=int, default=1024, help="prompt length T for prefill")
    ap.add_argument("--decode", type=int, default=32, help="tokens per single-stream decode measurement")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the batched decode")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    tune_malloc()                                   # as goose serve does (engine/model/allocator.py)
    with tempfile.TemporaryDirectory() as tmp:
        stem = os.path.join(tmp, "rwkv7-0b1-random")
        print(f"writing a random 0.1B-shaped checkpoint (L{SHAPE_0B1.n_layer} C{SHAPE_0B1.n_embd} "
              f"V{SHAPE_0B1.vocab_size}) ...", file=sys.stderr)
        call_in_new_thread(write_checkpoint, stem + ".pth", SHAPE_0B1, seed=0)
        rows = []
        with_llama = llama_cpp_available()
        for dtype in args.dtypes.split(","):
            print(f"[cpu {dtype}] reference ...", file=sys.stderr)
            # each contender on a thread that exits, so no one's idle OpenMP team slows the next (engine/model/threads.py)
            ref = call_in_new_thread(bench_reference, stem, dtype, args.prefill, args.decode, args.repeats)
            print(f"[cpu {dtype}] goose ...", file=sys.stderr)
            ours = call_in_new_thread(bench_goose, stem + ".pth", dtype, args.prefill, args.decode, args.batch,
                                      args.repeats)
            llama = None
            if with_llama:
                print(f"[cpu {dtype}] llama.cpp (GGUF via goose convert) ...", file=sys.stderr)
                gguf_path = call_in_new_thread(export_gguf, stem + ".pth", dtype)
                llama = call_in_new_thread(bench_llamacpp, gguf_path, args.prefill, args.decode, args.repeats)
                os.remove(gguf_path)
            rows.append((dtype, ref, ours, llama))
        quant_rows, llama_quant = {}, {}
        for name in [q for q in args.quant.split(",") if q]:
            print(f"[cpu {name}] goose ...", file=sys.stderr)
            quant_rows[name] = call_in_new_thread(bench_goose, stem + ".pth", name, args.prefill, args.decode,
                                                  args.batch, args.repeats)
            kind = name[-2:]
            if with_llama and kind not in llama_quant:     # one GGUF per quantization: activations are llama.cpp's
                qtype, how = QUANT_GGUF[kind]
                print(f"[{qtype}] llama.cpp ({how}) ...", file=sys.stderr)
                gguf_path = call_in_new_thread(export_quantized_gguf, stem + ".pth", kind)
                llama_quant[kind] = call_in_new_thread(bench_llamacpp, gguf_path, args.prefill, args.decode,
                                                       args.repeats)
                llama_quant[kind]["bytes"], llama_quant[kind]["types"] = gguf_bytes_per_token(gguf_path)
                os.remove(gguf_path)
        if with_llama and quant_rows:                      # the float GGUFs' bytes, for their bound
            for dtype, _, _, llama in rows:
                gguf_path = call_in_new_thread(export_gguf, stem + ".pth", dtype)
                llama["bytes"], llama["types"] = gguf_bytes_per_token(gguf_path)
                os.remove(gguf_path)
        bandwidth = call_in_new_thread(read_bandwidth) if quant_rows else 0.0
    print(f"\nmachine: {machine_line()}")
    print("model: random RWKV-7 0.1B shape (L12 C768 H12 N64 V65536); reference: rwkv 0.8.32 (RWKV_JIT_ON=1)")
    print("goose kernels: " + "; ".join(f"cpu {dtype}: {ours['kernels']}" for dtype, _, ours, _ in rows)
          + " (GOOSE_NATIVE_KERNELS=0 / GOOSE_LINEAR=aten for the torch-only figures)")
    if with_llama:
        import llama_cpp
        print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, the same checkpoint as GGUF "
              f"(goose convert; F32 for fp32, BF16 for bf16), {torch.get_num_threads()} threads\n")
    else:
        print("llama.cpp: column skipped (llama-cpp-python is not installed: pip install llama-cpp-python)\n")
    extra_head = " llama.cpp tok/s | goose / llama.cpp |" if with_llama else ""
    print(f"| strategy | measure | rwkv 0.8.32 tok/s | goose tok/s | ratio | target |{extra_head}")
    print("|---|---|---:|---:|---:|---:|" + ("---:|---:|" if with_llama else ""))

    def extra(llama, ours, key):
        if not with_llama:
            return ""
        if key is None:
            return " - | - |"
        return f" {llama[key]:.1f} | {ours[key] / llama[key]:.2f}x |"
    for dtype, ref, ours, llama in rows:
        s = f"cpu {dtype}"
        print(f"| {s} | prefill T={args.prefill} | {ref['prefill']:.0f} | {ours['prefill']:.0f} | "
              f"{ours['prefill'] / ref['prefill']:.2f}x | >= 5x |{extra(llama, ours, 'prefill')}")
        print(f"| {s} | decode B=1 | {ref['decode']:.1f} | {ours['decode']:.1f} | "
              f"{ours['decode'] / ref['decode']:.2f}x | >= 1.0x |{extra(llama, ours, 'decode')}")
        print(f"| {s} | decode B={args.batch} aggregate | {ref['decode']:.1f} (B=1) | {ours['batched']:.0f} | "
              f"{ours['batched'] / ref['decode']:.1f}x | >= 20x |{extra(llama, ours, None)}")
    if quant_rows:
        llama_by_row = {dtype: llama for dtype, _, _, llama in rows}
        llama_by_row.update({name: llama_quant.get(name[-2:]) for name in quant_rows})
        print_quant_table(quant_rows, {dtype: ours for dtype, _, ours, _ in rows}, bandwidth, args,
                          llama_by_row if with_llama else None)
    return 0


def print_quant_table(quant_rows: dict, float_rows: dict, bandwidth: float, args, llama: dict | None) -> None:
    """Quantized strategies beside the float one with the same activations; B=1 decode against its bound; with
    llama (row name -> llama.cpp's results on the matching GGUF, or None), llama.cpp beside each row."""
    print(f"\nquantized strategies (Goose, same run); read bandwidth {bandwidth / 1e9:.1f} GB/s (a sum over 512 MiB); "
          f"bound = weight bytes per token / bandwidth")
    llama_head = (" llama.cpp GGUF | its bytes per token | llama.cpp prefill tok/s | llama.cpp decode B=1 tok/s | "
                  "llama.cpp share of bound | goose / llama.cpp decode |") if llama else ""
    print(f"| strategy | weights read per token | prefill T={args.prefill} tok/s | decode B=1 tok/s | "
          f"B=1 bound tok/s | share of bound | decode B={args.batch} tok/s |{llama_head}")
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---|---:|---:|---:|---:|---:|" if llama else ""))
    for name, r in [(f"{d}", float_rows[d]) for d in float_rows] + list(quant_rows.items()):
        base = float_rows.get(name[:4])

        def ratio(key: str) -> str:
            return f" ({r[key] / base[key]:.2f}x)" if base is not None and base is not r else ""
        bound = bandwidth / r["weight_bytes"]
        line = (f"| cpu {name} | {r['weight_bytes'] / 1e6:.0f} MB | {r['prefill']:.0f}{ratio('prefill')} | "
                f"{r['decode']:.1f}{ratio('decode')} | {bound:.1f} | {100 * r['decode'] / bound:.0f}% | "
                f"{r['batched']:.0f}{ratio('batched')} |")
        lr = llama.get(name) if llama else None
        if lr:
            line += (f" {lr['types']} | {lr['bytes'] / 1e6:.0f} MB | {lr['prefill']:.0f} | {lr['decode']:.1f} | "
                     f"{100 * lr['decode'] * lr['bytes'] / bandwidth:.0f}% | {r['decode'] / lr['decode']:.2f}x |")
        elif llama:
            line += " - | - | - | - | - | - |"
        print(line)
    print("(x): against the float strategy with the same activation dtype; goose kernels: "
          + "; ".join(f"cpu {n}: {r['kernels']}" for n, r in quant_rows.items()))
    if llama:
        print("llama.cpp: " + "; ".join(f"{qtype} for {kind} rows from {how}" for kind, (qtype, how) in
                                        QUANT_GGUF.items() if any(n.endswith(kind) for n in quant_rows))
              + "; the GGUF column lists the types of its matrices")


if __name__ == "__main__":
    sys.exit(main())
