"""GPU benchmark: prefill and batched decode of random 0.1B / 1.5B / 7.2B-shaped RWKV-7 models, with bounds.

    python -m bench.gpu [--shapes 0.1b,1.5b,7.2b] [--dtype fp16] [--prefill 4096] [--batches 1,64,256]
                        [--backends triton,chunked] [--device cuda] [--quant fp16i8,bf16i8] [--no-wkv]

For each shape: prefill tokens/s (one prompt of T tokens) and decode tokens/s at each batch size (aggregate
over the batch) through the model with each WKV backend, eagerly (model.forward per step, no sampling) and as
the engine decodes (engine/cuda_graphs.py: the step with sampling, captured as a CUDA graph, ids copied back
each step), next to the weight-read bound: the bytes of weights one decode step reads (everything but the
embedding table) over the device's measured copy bandwidth, times B. Then the WKV kernels alone at the shape's
heads: prefill T tokens (the Triton kernel, the torch chunked form, and flash-linear-attention's chunk_rwkv7 when
`fla` is installed) and one decode step at the largest B (ours, torch's, and fla's fused_recurrent_rwkv7).
Weights are drawn on the device (bench/random_checkpoint.py), so a 7.2B shape costs seconds, not a file.

`--quant fp16i8,bf16i8` adds, for each shape and backend, the int8 strategies (engine/model/quant.py: int8
matrices quantized from the same weights on the device, the Triton product of kernels/quant_triton.py) as rows
beside the float one, each against its own weight-read bound (the int8 model reads about half the bytes), and
a last line per shape comparing their decode with the float row's. `--no-wkv` skips the WKV kernels alone.

`--device cpu --shapes tiny --backends chunked` runs the same code on a CPU, to check the script itself (the
"graphs" figures are then the same static step run eagerly; `--quant bf16i8` is then the CPU's native product).
`goose bench engine --device cuda ...` runs this. Issue #17's targets (one H200): 7.2B fp16 B=1 decode >= 60% of
the bound, B=256 >= 5,000 tok/s, prefill >= 10,000 tok/s.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.machine import machine_line
from bench.random_checkpoint import SHAPE_0B1, CheckpointShape, random_state_dict
from engine.cuda_graphs import DecodeGraphs
from engine.formats.checkpoint import infer_config
from engine.request import SamplingParams
from engine.sampling import SamplerRow, make_generator
from engine.state_pool import StatePool
from engine.model.rwkv7 import RWKV7
from engine.model.strategy import parse_strategy, prepare_device
import kernels

# LoRA ranks of the released 1.5B and 7.2B are approximate here; they are a few percent of the weight bytes.
SHAPES = {
    "tiny": CheckpointShape(n_layer=2, n_embd=128, head_size=64, vocab_size=1024),
    "0.1b": SHAPE_0B1,
    "1.5b": CheckpointShape(n_layer=24, n_embd=2048, head_size=64, vocab_size=65536,
                            decay_lora=96, iclr_lora=96, value_lora=64, gate_lora=256),
    "7.2b": CheckpointShape(n_layer=32, n_embd=4096, head_size=64, vocab_size=65536,
                            decay_lora=128, iclr_lora=128, value_lora=96, gate_lora=480),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats=5)
    return 2 * n / seconds


def weight_read_bytes(sd: dict[str, torch.Tensor]) -> int:
    """Bytes a decode step reads: every weight except the embedding table (one row per token)."""
    return sum(t.numel() * t.element_size() for k, t in sd.items() if k != "emb.weight")


def model_read_bytes(model: RWKV7) -> int:
    """weight_read_bytes of a loaded model, as it holds its weights (int8 matrices count their codes and scales)."""
    from bench.engine import weight_bytes_per_token
    return weight_bytes_per_token(model)


def bench_model(model: RWKV7, device, T: int, batches: list[int], steps: int) -> dict:
    V = model.config.vocab_size
    prompt = (torch.arange(T, device=device).view(1, T) * 7919) % V
    out = {"prefill": T / timed(lambda: model.forward(prompt, None), device)}
    for B in batches:
        _, state = model.forward(prompt[:, :8].expand(B, 8).contiguous(), None)
        toks = (torch.arange(B, device=device).view(B, 1) + 100) % V

        def decode():
            for _ in range(steps):
                model.forward(toks, state)
        out[f"B={B}"] = B * steps / timed(decode, device, repeats=2)
    return out


def bench_graphs(model: RWKV7, device, B: int, steps: int) -> float:
    """Tokens/s of the engine's decode step at batch B: forward and sampling (temperature 1) over the static
    buffers of a B-row pool, captured as a CUDA graph on CUDA, and the ids copied back every step."""
    pool = StatePool(model, B)
    graphs = DecodeGraphs(model, pool, sizes=[B])
    graphs.capture_all()
    keys = list(range(B))
    for key in keys:
        pool.alloc(key)
    rows = [SamplerRow(SamplingParams(temperature=1.0), make_generator(0, i)) for i in keys]
    toks = [100 + i for i in keys]

    def decode():
        nonlocal toks
        for _ in range(steps):
            _, ids = graphs.launch(keys, toks, rows)
            toks = ids()
    return B * steps / timed(decode, device, repeats=2)


def wkv_inputs(B, T, H, N, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, device=device)  # noqa: E731
    w = -0.6065306597126334 * torch.sigmoid(rnd() * 4)
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    ins = [rnd(), w, rnd() * 0.5, rnd(), -kk, kk * torch.sigmoid(rnd())]
    return [t.to(dtype) for t in ins] + [torch.zeros(B, H, N, N, device=device)]


def bench_kernels(H: int, N: int, T: int, B: int, dtype, device) -> dict:
    """Tokens/s of the WKV kernels alone: prefill of one T-token prompt, and one decode step at batch B."""
    out = {}
    seq = wkv_inputs(1, T, H, N, dtype, device)
    names = ["triton", "chunked"] if device.type == "cuda" else ["chunked"]
    for name in names:
        fn = kernels.get_wkv7(name)
        out[f"prefill {name}"] = T / timed(lambda: fn(*seq), device)
    if device.type == "cuda":                            # the Triton token loop, against its chunked default
        fn = kernels.get_wkv7("triton")
        out["prefill triton loop"] = T / timed(lambda: fn(*seq, chunk_len=0), device)
    try:
        from fla.ops.rwkv7 import chunk_rwkv7          # state [N, H, K, V]: the transpose of ours
        r, w, k, v, a, b, s = seq
        out["prefill fla"] = T / timed(lambda: chunk_rwkv7(r, w, k, v, a, b, initial_state=s.transpose(-1, -2),
                                                           output_final_state=True), device)
    except ImportError:
        pass
    except Exception as exc:                             # a changed fla API must not end the benchmark
        out["prefill fla"] = f"failed: {type(exc).__name__}: {exc}"[:80]
    step = wkv_inputs(B, 1, H, N, dtype, device)
    for name in (["triton_step_", "step_"] if device.type == "cuda" else ["step_"]):
        fn = kernels.get_wkv7(name)
        out[f"step B={B} {name}"] = B / timed(lambda: fn(*step), device, repeats=10)
    try:
        from fla.ops.rwkv7 import fused_recurrent_rwkv7
        r, w, k, v, a, b, s = step
        s_t = s.transpose(-1, -2).contiguous()
        out[f"step B={B} fla"] = B / timed(lambda: fused_recurrent_rwkv7(r, w, k, v, a, b, initial_state=s_t,
                                                                         output_final_state=True), device,
                                           repeats=10)
    except ImportError:
        pass
    except Exception as exc:                             # noqa: BLE001 - as above
        out[f"step B={B} fla"] = f"failed: {type(exc).__name__}: {exc}"[:80]
    return out


def fmt(x) -> str:
    return f"{x:,.0f}" if isinstance(x, float) else str(x)


def report_model(model: RWKV7, label: str, device, args, batches: list[int], bound: float) -> tuple[float, dict]:
    """Measure one model (prefill, eager decode, graphed decode), print its two lines; (prefill, graphed)."""
    res = bench_model(model, device, args.prefill, batches, args.steps)
    prefill = res.pop("prefill")
    cells = [f"prefill {fmt(prefill)} tok/s"]
    cells += [f"{k} {fmt(v)} tok/s ({100 * v / (bound * int(k[2:])):.0f}% of bound)" for k, v in res.items()]
    print(f"  {label} eager  " + " | ".join(cells), flush=True)
    graphed = {B: bench_graphs(model, device, B, args.steps) for B in batches}
    print(f"  {label} graphs " + " | ".join(
        f"B={B} {fmt(v)} tok/s ({100 * v / (bound * B):.0f}% of bound)" for B, v in graphed.items()), flush=True)
    return prefill, graphed


def report_quantized(sd, config, shape_name: str, device, args, batches: list[int], float_rows: dict,
                     bandwidth: float) -> None:
    """The --quant strategies on the shape's weights, each backend beside the float row of the same backend."""
    for quant_name in args.quant.split(","):
        strategy = parse_strategy(f"{args.device} {quant_name}")
        for backend in args.backends.split(","):
            t0 = time.perf_counter()
            model = RWKV7(sd, config, strategy, wkv_backend=backend, name=shape_name, native_kernels=False)
            bound = bandwidth / model_read_bytes(model)
            print(f"  {quant_name} {backend}: {model_read_bytes(model) / 1e9:.2f} GB read per step, bound "
                  f"{bound:,.1f} steps/s, product {model.linear_backend}, quantized in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            prefill, graphed = report_model(model, f"{quant_name:6s} {backend:8s}", device, args, batches, bound)
            f_prefill, f_graphed = float_rows[backend]
            print(f"  {quant_name} {backend} / {args.dtype}: prefill {prefill / f_prefill:.2f}x, " + ", ".join(
                f"B={B} decode {graphed[B] / f_graphed[B]:.2f}x" for B in batches), flush=True)
            del model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="0.1b,1.5b,7.2b")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed run")
    ap.add_argument("--backends", default="triton,chunked")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quant", default="", help="int8 strategies to add as rows, e.g. fp16i8,bf16i8")
    ap.add_argument("--no-wkv", action="store_true", help="skip the WKV kernels alone")
    args = ap.parse_args(argv)
    strategy = parse_strategy(f"{args.device} {args.dtype}")
    for quant_name in filter(None, args.quant.split(",")):   # a bad --quant fails before anything is measured
        parse_strategy(f"{args.device} {quant_name}")
    prepare_device(strategy)
    device, dtype = strategy.device, strategy.dtype
    batches = [int(b) for b in args.batches.split(",")]
    print(machine_line() if device.type == "cpu" else torch.cuda.get_device_name(device), flush=True)
    bandwidth = copy_bandwidth(device)
    print(f"measured copy bandwidth: {bandwidth / 1e9:,.0f} GB/s; dtype {args.dtype}, prefill T={args.prefill}",
          flush=True)
    targets = []
    for shape_name in args.shapes.split(","):
        t0 = time.perf_counter()
        sd = random_state_dict(SHAPES[shape_name], seed=0, dtype=dtype, device=device)
        config = infer_config(sd, shape_name)
        bound = bandwidth / weight_read_bytes(sd)
        print(f"\n== {shape_name}: L{config.n_layer} C{config.n_embd} H{config.n_head}, "
              f"{weight_read_bytes(sd) / 1e9:.2f} GB read per step; weight-read bound {bound:,.1f} steps/s "
              f"(B x that tok/s); made in {time.perf_counter() - t0:.1f} s", flush=True)
        float_rows = {}
        for backend in args.backends.split(","):
            model = RWKV7(sd, config, strategy, wkv_backend=backend, name=shape_name, native_kernels=False)
            prefill, graphed = report_model(model, f"model {backend:8s}", device, args, batches, bound)
            float_rows[backend] = prefill, graphed
            if shape_name == "7.2b":
                targets.append((backend, prefill, graphed, bound))
            del model
        if args.quant:
            report_quantized(sd, config, shape_name, device, args, batches, float_rows, bandwidth)
        if not args.no_wkv:
            ker = bench_kernels(config.n_head, config.head_size, args.prefill, max(batches), dtype, device)
            print("  wkv alone: " + " | ".join(f"{k} {fmt(v)} tok/s" for k, v in ker.items()), flush=True)
        del sd
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for backend, prefill, graphed, bound in targets:
        print(f"\nissue #17 targets, 7.2B {args.dtype}, {backend} backend:")
        if 1 in graphed:
            print(f"  decode B=1 {fmt(graphed[1])} tok/s = {100 * graphed[1] / bound:.0f}% of the bound "
                  f"{fmt(bound)} (target >= 60%): {'met' if graphed[1] >= 0.6 * bound else 'NOT met'}")
        if 256 in graphed:
            print(f"  decode B=256 {fmt(graphed[256])} tok/s (target >= 5,000): "
                  f"{'met' if graphed[256] >= 5000 else 'NOT met'}")
        print(f"  prefill T={args.prefill} {fmt(prefill)} tok/s (target >= 10,000): "
              f"{'met' if prefill >= 10000 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
