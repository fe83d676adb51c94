"""The decode step over static buffers, captured as one CUDA graph per bucketed batch size.

A decode step is the model's forward for one token per decoding sequence, on pool rows [0, D) in place, then
sampling. Here it reads everything from buffers allocated once next to the state pool, on its device: the
tokens, each row's sampling parameters and uniform, and it writes the sampled ids into another. The batch is
padded up to a bucket (1, 2, 4, 8, ... and the pool's size) whose rows past D are free pool rows (StatePool.clear
moves any owner away first: their results are never read, and a row is zeroed when it is next allocated).

On CUDA each (bucket, filters) body is captured once, when the engine starts and every row is free (the warm-up
runs that precede a capture would otherwise advance live states), into one shared memory pool; a step is then
two host-to-device copies from pinned memory, one graph replay, and one device-to-host copy of the ids, with
no other synchronisation (tests/test_gpu.py checks it under torch.cuda.set_sync_debug_mode("error")).
Elsewhere (cuda_graphs "on" on a CPU, or capture=False) the same body runs eagerly on the same buffers, which is
how CPU tests prove the padding, the free rows and the rows written back against the plain decode path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.sampling import SamplerRow, draw_uniforms, sample_on_device
from engine.state_pool import StatePool

log = logging.getLogger("goose.engine")
MODES = ("auto", "on", "off")
_PARAMS = ("temperature", "top_p", "min_p", "greedy", "u")      # float columns of the staging buffer


def buckets(size: int) -> list[int]:
    """Batch sizes a step is padded to: powers of two below ``size``, then ``size`` itself."""
    out, b = [], 1
    while b < size:
        out.append(b)
        b *= 2
    return out + [size]


def use_static_decode(mode: str, device: torch.device) -> bool:
    """cuda_graphs: "auto" = on for CUDA, off elsewhere; "on" = the static path everywhere (graphs on CUDA)."""
    if mode not in MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class DecodeGraphs:
    """Static decode buffers for ``pool`` and, on CUDA, the captured graphs over them."""

    def __init__(self, model, pool: StatePool, *, sizes: list[int] | None = None, capture: bool | None = None):
        self.model = model
        self.pool = pool
        self.device = pool.state.wkv[0].device
        self.sizes = sorted(sizes) if sizes is not None else buckets(pool.size)
        if self.sizes[-1] > pool.size:
            raise ValueError(f"bucket {self.sizes[-1]} exceeds the pool's {pool.size} rows")
        self.capture = self.device.type == "cuda" if capture is None else capture
        n, dev = pool.size, self.device
        pin = self.device.type == "cuda"
        # one row per pool row, so a step's rows [0, bucket) are one contiguous block to copy
        self._host_long = torch.zeros(n, 2, dtype=torch.long, pin_memory=pin)           # token, top_k
        self._host_f32 = torch.zeros(n, len(_PARAMS), dtype=torch.float32, pin_memory=pin)
        self._host_ids = torch.zeros(n, dtype=torch.long, pin_memory=pin)
        self._dev_long = torch.zeros(n, 2, dtype=torch.long, device=dev)
        self._dev_f32 = torch.zeros(n, len(_PARAMS), dtype=torch.float32, device=dev)
        self._dev_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, bool], torch.Tensor] = {}
        self._done = torch.cuda.Event() if self.device.type == "cuda" else None
        self.steps = self.sampled = self.fallbacks = 0      # static steps, of which sampled here; eager steps

    # ------------------------------------------------------------------------------------------ the body
    def _body(self, bucket: int, filters: bool) -> torch.Tensor:
        """Forward and sample rows [0, bucket) from the static buffers; returns the logits [bucket, V]."""
        tokens = self._dev_long[:bucket, :1]
        logits, _ = self.model.forward(tokens, self.pool.state.narrow(0, bucket))
        temperature, top_p, min_p, greedy, u = self._dev_f32[:bucket].unbind(1)
        ids = sample_on_device(logits, temperature, self._dev_long[:bucket, 1], top_p, min_p, greedy > 0.5, u,
                               filters=filters)
        self._dev_ids[:bucket].copy_(ids)
        return logits

    def capture_all(self) -> None:
        """Capture every (bucket, filters) body, largest first, into one memory pool. Call while no pool row is
        live: the warm-up runs write rows [0, bucket)."""
        if not self.capture or self._graphs:
            return
        if self.pool.used:
            raise RuntimeError("CUDA graphs are captured before any state row is in use")
        self._dev_f32.fill_(1.0)                                    # warm-ups: greedy rows at temperature 1
        mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            for bucket in sorted(self.sizes, reverse=True):
                for filters in (True, False):
                    with torch.cuda.stream(side):                   # compile kernels, size workspaces
                        for _ in range(2):
                            self._body(bucket, filters)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=mempool):
                        self._logits[bucket, filters] = self._body(bucket, filters)
                    self._graphs[bucket, filters] = graph
            for t in self.pool.state.tensors():                     # the warm-ups wrote free rows: tidy up
                t.zero_()
        torch.cuda.synchronize(self.device)
        log.info("decode captured as CUDA graphs for batch sizes %s", self.sizes)

    # ------------------------------------------------------------------------------------------ a step
    def launch(self, keys: list, tokens: list[int], rows: list[SamplerRow], *,
               sample: bool = True) -> tuple[torch.Tensor, Callable[[], list[int]]] | None:
        """Start one decode step for the sequences ``keys`` (their pending ``tokens``, their sampler ``rows``).
        Returns (the logits [D, V] on the device, valid until the next step; a function that waits for the
        sampled ids and returns them), or None when the padding rows cannot be freed (the caller decodes
        eagerly). With ``sample`` False the ids are not copied back (the caller samples the logits)."""
        D = len(keys)
        bucket = next(b for b in self.sizes if b >= D) if D <= self.sizes[-1] else None
        self.pool.pack(keys)
        if bucket is None or not self.pool.clear(D, bucket):
            self.fallbacks += 1
            return None
        self._stage(bucket, tokens, rows, sample)
        filters = any(not _plain(r) for r in rows)
        self._dev_long[:bucket].copy_(self._host_long[:bucket], non_blocking=True)      # pinned: no sync
        self._dev_f32[:bucket].copy_(self._host_f32[:bucket], non_blocking=True)
        key = (bucket, filters)
        if key in self._graphs:
            self._graphs[key].replay()
            logits = self._logits[key]
        else:
            with torch.inference_mode():
                logits = self._body(bucket, filters)
        self.steps += 1
        if sample:
            self.sampled += 1
            self._host_ids[:D].copy_(self._dev_ids[:D], non_blocking=True)
        if self._done is not None:
            self._done.record()
        return logits[:D], self._finish(D)

    def _stage(self, bucket: int, tokens: list[int], rows: list[SamplerRow], sample: bool) -> None:
        """Write the step's inputs into the host staging buffers; padding rows are greedy on token 0. The rows'
        generators give their uniforms only when the ids are sampled here (else the host sampler draws them)."""
        D = len(tokens)
        hl, hf = self._host_long, self._host_f32
        hl[:bucket].zero_()
        hf[:bucket].zero_()
        hf[D:bucket, _PARAMS.index("greedy")] = 1.0
        if D:
            hl[:D] = torch.tensor([[t, r.params.top_k] for t, r in zip(tokens, rows)], dtype=torch.long)
            u = draw_uniforms(rows) if sample else [0.0] * D
            hf[:D] = torch.tensor([[r.params.temperature, r.params.top_p, r.params.min_p, float(r.params.greedy), x]
                                   for r, x in zip(rows, u)], dtype=torch.float32)

    def _finish(self, D: int) -> Callable[[], list[int]]:
        def ids() -> list[int]:
            if self._done is not None:
                self._done.synchronize()                    # the step's one wait: for its ids
            return self._host_ids[:D].tolist()
        return ids


def _plain(row: SamplerRow) -> bool:
    p = row.params
    return p.greedy or (p.top_k <= 0 and p.min_p == 0 and p.top_p >= 1.0)
