"""RWKV-7 x070 inference model: one forward for prefill and decode, fp32 state and norms, matmuls in the strategy dtype."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from kernels import native, native_decode, native_step
from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model.allocator import release_free_memory, release_pages
from engine.model.layers import LayerWeights, Lora, owned, prepare_layer
from engine.model.linear import select_linear
from engine.model import quant
from engine.model.state import RNNState
from engine.model.strategy import Strategy, parse_strategy, prepare_device
from engine.formats.checkpoint import load_weights, weights_identity
from engine.formats.quantized import for_strategy

LOG_DECAY_SCALE = -0.6065306597126334   # -exp(-0.5): log-decay = LOG_DECAY_SCALE * sigmoid(z), in [-0.607, 0)
LN_EPS = 1e-5
GROUP_NORM_EPS = 64e-5                  # head_size * 1e-5 in every released model (RWKV-LM "notice eps value")
FUSED_TRITON_BELOW = 16                 # wkv_backend="triton": shorter inputs (decode) run the fused Triton time mix
log = logging.getLogger("goose.engine")
SEQUENCE_BACKENDS = ("chunked", "reference", "triton")  # kernels for T > 1 when the native time mix is off
STEP_BACKENDS = {"chunked": "step_", "triton": "triton_step_"}  # decode (T = 1); reference uses itself
DECODE_ROWS = 16        # single-token steps of up to this many sequences take the native LoRA + time mix call


class RWKV7:
    """An RWKV-7 model ready for inference. Build it with ``load_model``."""

    def __init__(self, sd: dict[str, torch.Tensor], config: ModelConfig, strategy: Strategy,
                 *, wkv_backend: str = "chunked", name: str = "rwkv7", linear_backend: str | None = None,
                 native_kernels: bool | None = None):
        self.config = config
        self.strategy = strategy
        self.name = name
        self.identity = weights_identity(sd, config)
        """A hash of the weights and the config: states and outputs are only ever shared between equal models."""
        self.device, self.dtype = strategy.device, strategy.dtype
        self._wkv_seq = kernels.get_wkv7(wkv_backend)
        step = STEP_BACKENDS.get(wkv_backend)
        self._wkv_step_ = kernels.get_wkv7(step) if step is not None else None
        self.wkv_backend = wkv_backend
        linear = select_linear(self.device, self.dtype, linear_backend)
        self._linear, pack = linear.fn, linear.prepare                 # float products: the LoRA factors
        self._small_rows = linear.small_rows
        # the projections, the FFN and the head: quantized (engine/model/quant.py) or the float product
        proj = quant.select_quantized(strategy.quant, self.device, linear) if strategy.quant else linear
        self._proj = proj.fn
        self.linear_backend = linear.name if proj is linear else f"{proj.name} (LoRA: {linear.name})"
        quantized = quant.QUANTIZED if strategy.quant else ()
        self._packed_layouts: dict = {}         # oneDNN-packed matrices the native step reads (native_step.py)
        read_packed = (native_kernels is not False and self.device.type == "cpu" and wkv_backend == "chunked"
                       and _native_mode() != "0")   # where the native step may run (never builds otherwise)

        def f32(key: str) -> torch.Tensor:
            return owned(sd[key].to(device=self.device, dtype=torch.float32).contiguous(), sd[key])

        def mat(key: str):                                  # quantized in fp32 by chunks of rows
            if quant.kind_of(sd[key]) is not None:          # stored quantized (a goose convert --dtype i8/i4 file, a
                return proj.prepare(sd[key])                # GGUF's Q8_0/Q4_0): used as it is, on the model's device
            if quant.family(key) in quantized:
                prepared = proj.prepare(sd[key])
                release_pages(sd[key])                      # the float matrix is not read again (allocator.py)
                return prepared
            plain = sd[key].to(device=self.device, dtype=self.dtype).contiguous()
            packed = pack(plain)
            if packed is not plain:
                if read_packed:
                    layout = native_step.packed_layout(packed, plain)  # the single-token step reads it too
                    if layout is not None:
                        self._packed_layouts[torch.ops.mkldnn.data_ptr(packed)] = layout
                release_pages(sd[key])                      # packed into a copy of its own: the file's pages go
            return packed

        def lora(key: str) -> Lora:                         # stored [in, out]: transposed once
            plain = owned(sd[key].to(device=self.device, dtype=self.dtype).t().contiguous(), sd[key])
            return plain, pack(plain)                       # the same tensor when the backend keeps it plain
        C = config.n_embd
        emb = F.layer_norm(f32("emb.weight"), (C,), f32("blocks.0.ln0.weight"), f32("blocks.0.ln0.bias"), LN_EPS)
        self.emb = emb.to(self.dtype)                       # [V, C], ln0 folded in
        self.ln_out = (f32("ln_out.weight"), f32("ln_out.bias"))
        self.head = mat("head.weight")                      # [V, C]
        self.layers = [prepare_layer(i, f32, mat, lora) for i in range(config.n_layer)]
        self._native_time_mix = self._prepare_native(native_kernels)
        self._native_decode = self._prepare_native_decode()
        if self._native_decode is not None and linear.plain and not strategy.quant:
            self._proj = _few_rows_native(self._proj)       # plain float weights: the native product for decode
        if self._native_decode is None and not linear.small_rows:    # the plain LoRA copies are unused: drop them
            for lw in self.layers:
                for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
                    if getattr(lw, name) is not None:
                        setattr(lw, name, (getattr(lw, name)[1],) * 2)
        self.decode_kernel = ("native" if self._native_time_mix is not None
                              else "triton" if wkv_backend == "triton" else "torch")
        self._triton_time_mix = self._prepare_triton_time_mix()
        self._step = self._prepare_step()

    def _prepare_native(self, wanted: bool | None):
        """The fused native time mix per layer (kernels/native.py), for decode and prompts, or None for the
        torch ops (the WKV backend's chunked form for prompts, the step for decode).

        wanted: None = when it can be used (CPU, fp32 state, not the reference backend, the library builds;
        GOOSE_NATIVE_KERNELS=1 turns a failure to build into an error), True = required, False = never."""
        explicit = wanted is not None
        if wanted is None:
            wanted = {"0": False, "1": True}.get(_native_mode())
        if wanted is False:
            return None
        if self.device.type != "cpu" or self.wkv_backend != "chunked":
            if explicit:      # GOOSE_NATIVE_KERNELS=1 is about building them: it does not fail a CUDA model
                why = (f"they run on CPU, the model is on {self.device}" if self.device.type != "cpu"
                       else f"the {self.wkv_backend} WKV backend was asked for")
                raise ModelLoadError(f"native CPU kernels were required but cannot be used: {why}")
            return None
        cfg = self.config
        try:
            return [native.TimeMix(
                cfg.n_head, cfg.head_size, w0=lw.w0, a0=lw.a0, v0=lw.v0, k_k=lw.k_k, k_a=lw.k_a,
                r_k=lw.r_k, ln_w=lw.ln_x[0], ln_b=lw.ln_x[1], eps=GROUP_NORM_EPS,
                log_decay_scale=LOG_DECAY_SCALE) for lw in self.layers]
        except native.NativeUnavailable as exc:
            if wanted:
                raise ModelLoadError(f"native CPU kernels were required but cannot be used: {exc}") from None
            log.warning("the time mix runs on torch ops (slower): %s", exc)
            return None

    def _prepare_native_decode(self):
        """The native LoRA chains + time mix per layer for single-token steps (kernels/native_decode.py), on the
        plain LoRA factors; None where the native time mix is off."""
        if self._native_time_mix is None:
            return None
        cfg = self.config
        return [native_decode.LoraTimeMix(
            cfg.n_head, cfg.head_size,
            {name: None if getattr(lw, name) is None else getattr(lw, name)[0]
             for name in ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2")},
            dict(w0=lw.w0, a0=lw.a0, v0=lw.v0, k_k=lw.k_k, k_a=lw.k_a, r_k=lw.r_k, ln_w=lw.ln_x[0], ln_b=lw.ln_x[1]),
            eps=GROUP_NORM_EPS, log_decay_scale=LOG_DECAY_SCALE) for lw in self.layers]

    def _prepare_step(self):
        """The whole single-token step as one native call (kernels/native_step.py) where the native decode is on
        and every big matrix is one the step can read (quantized, or plain float); else None."""
        if self._native_decode is None:
            return None
        cfg = self.config
        try:
            return native_step.DecodeStep(
                n_head=cfg.n_head, head_size=cfg.head_size, emb=self.emb, ln_out=self.ln_out, head=self.head,
                layers=self.layers, act_dtype=self.dtype, ln_eps=LN_EPS, gn_eps=GROUP_NORM_EPS,
                log_decay_scale=LOG_DECAY_SCALE, layouts=self._packed_layouts)
        except ValueError as exc:               # e.g. oneDNN-packed float weights: the per-layer path decodes
            log.debug("no native single-token step: %s", exc)
            return None

    # ------------------------------------------------------------------------------------------ public API
    def zero_state(self, batch_size: int = 1) -> RNNState:
        return RNNState.zeros(self.config, batch_size, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: RNNState | None = None, full_output: bool = False):
        """Advance ``state`` by the T tokens of each row and return (logits, state).

        tokens: LongTensor [B, T] (T >= 1). The state is updated in place and returned; clone() it first to
        keep a snapshot. logits: float32 [B, T, V] with full_output, else [B, V] for the last position.
        """
        if self._step is not None and not full_output:
            # one token for a few sequences: the whole model as one native call (kernels/native_step.py)
            tokens = self._check_tokens(tokens)
            B, T = tokens.shape
            if state is None:
                state = self.zero_state(B)
            if (T == 1 and 0 < B <= native_step.STEP_ROWS and state.batch_size == B
                    and all(t.is_contiguous() for t in state.tensors())):
                return self._step(tokens[:, 0], state.att_x, state.wkv, state.ffn_x), state
        hidden, state = self.forward_hidden(tokens, state, full_output=full_output)
        return self._proj(hidden.to(self.dtype), self.head).float(), state

    __call__ = forward

    @torch.inference_mode()
    def forward_hidden(self, tokens: torch.Tensor, state: RNNState | None = None, full_output: bool = False):
        """Like forward, but return the final normalized hidden state (ln_out output, before the head):
        float32 [B, T, C] with full_output, else [B, C]. Used for embeddings."""
        tokens = self._check_tokens(tokens)
        B, T = tokens.shape
        if state is None:
            state = self.zero_state(B)
        elif state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} sequences but tokens has {B} rows")
        x = self.emb[tokens].float()                        # [B, T, C] fp32 residual stream
        v_first = None
        pending = None                                      # the last block's output, added by the next _mix
        for i, lw in enumerate(self.layers):
            mixed = self._mix(x, pending, lw.ln1, state.att_x[i], lw.att_mix)          # [6, B, T, C] in dtype
            dx, v_first = self._time_mix(i, lw, mixed, state, v_first)
            xk = self._mix(x, dx, lw.ln2, state.ffn_x[i], lw.ffn_mix)[0]
            pending = self._channel_mix(lw, xk)
        x.add_(pending)
        if not full_output:
            x = x[:, -1]
        return F.layer_norm(x, (self.config.n_embd,), self.ln_out[0], self.ln_out[1], LN_EPS), state

    # ------------------------------------------------------------------------------------------ blocks
    def _check_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be a LongTensor [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
        # ids are the caller's to check (the engine does once per request): a range check here would read the
        # tokens back from the device on every forward
        return tokens.to(self.device, torch.long)

    def _mix(self, x: torch.Tensor, dx: torch.Tensor | None, ln, prev: torch.Tensor,
             mix: torch.Tensor) -> torch.Tensor:
        """x += dx (in place; dx the previous block's output or None), then the layer norm ``ln`` and the token
        shift's M mixes [M, B, T, C] in the matmul dtype; ``prev`` (the state's shift row) takes the last token's
        normalized x. One native call on CPU (kernels/native_decode.py), else torch ops."""
        if self._native_time_mix is not None and prev.is_contiguous():
            return native_decode.residual_ln_mix(x, dx, ln, LN_EPS, prev, mix, self.dtype)
        if dx is not None:
            x.add_(dx)
        h = F.layer_norm(x, (self.config.n_embd,), ln[0], ln[1], LN_EPS)
        shifted = prev.unsqueeze(1) if h.shape[1] == 1 else torch.cat((prev.unsqueeze(1), h[:, :-1]), dim=1)
        mixed = torch.addcmul(h, shifted - h, mix.view(mix.shape[0], 1, 1, -1)).to(self.dtype)
        prev.copy_(h[:, -1])
        return mixed

    def _time_mix(self, i: int, lw: LayerWeights, mixed: torch.Tensor, state: RNNState, v_first):
        _, B, T, C = mixed.shape
        dt = self.dtype
        lin = self._proj
        xr, xk, xv, xw, xa, xg = mixed.unbind(0)
        S = state.wkv[i]
        r, k, v = lin(xr, lw.w_r), lin(xk, lw.w_k), lin(xv, lw.w_v)                       # [B, T, A]
        if self._native_decode is not None and T == 1 and B <= DECODE_ROWS and S.is_contiguous():
            # one token per sequence: the LoRA chains and the time mix in one native call
            if i == 0:
                v_first = v
            first = v_first.to(r.dtype) if i > 0 else None
            return lin(self._native_decode[i](mixed, r, k, v, first, S, dt), lw.w_out), v_first
        fused = self._native_time_mix is not None and S.is_contiguous()
        # the native kernel takes the projections in their dtype (it widens bf16 itself): no float copies
        rows = (lambda t: t) if fused else (lambda t: t.float())  # noqa: E731
        r, k, v = rows(r), rows(k), rows(v)
        lora = self._lora
        w_lora = rows(lora(torch.tanh(lora(xw, lw.w1)), lw.w2))
        a_lora = rows(lora(lora(xa, lw.a1), lw.a2))
        g = rows(lora(torch.sigmoid(lora(xg, lw.g1)), lw.g2))
        v_lora = rows(lora(lora(xv, lw.v1), lw.v2)) if i > 0 else None
        if i == 0:
            v_first = v
        if fused:
            first = v_first.to(r.dtype) if i > 0 else None       # (float32 if layer 0 took the torch ops)
            out = self._native_time_mix[i](r, w_lora, k, v, a_lora, v_lora, first, g, S, out_dtype=dt)
        else:
            out = self._time_mix_core(i, lw, r, w_lora, k, v, a_lora, v_lora, v_first, g, state).to(dt)
        return lin(out, lw.w_out), v_first          # in dt: the residual add widens it

    def _lora(self, x: torch.Tensor, w: Lora) -> torch.Tensor:
        """A LoRA product: F.linear on the plain factor for a few rows (decode), where it is ~3x faster than
        the backend's call overhead on these small matrices, else the backend (see Linear.small_rows)."""
        if x.numel() <= self._small_rows * x.shape[-1]:
            return F.linear(x, w[0])
        return self._linear(x, w[1])

    def _time_mix_core(self, i, lw, r, w_lora, k, v, a_lora, v_lora, v_first, g, state) -> torch.Tensor:
        """The time mix between the projections and the output projection, in torch ops (the native
        kernel's ground truth, and the path on CUDA, without the native kernels, and for strided states)."""
        B, T, _ = r.shape
        if self._triton_time_mix is not None and T < FUSED_TRITON_BELOW:     # wkv_backend="triton": one launch
            return self._time_mix_triton(i, r, w_lora, k, v, a_lora, v_lora, v_first, g, state)
        H, N = self.config.n_head, self.config.head_size
        log_w = LOG_DECAY_SCALE * torch.sigmoid(lw.w0 + w_lora)
        alpha = torch.sigmoid(lw.a0 + a_lora)
        kk = F.normalize((k * lw.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (alpha - 1) * lw.k_a)
        if v_lora is not None:
            v = v + (v_first - v) * torch.sigmoid(lw.v0 + v_lora)
        y = self._wkv(i, r, log_w, k, v, -kk, kk * alpha.view(B, T, H, N), state)    # [B, T, H, N] fp32
        y = F.group_norm(y.reshape(B * T, H * N), H, lw.ln_x[0], lw.ln_x[1], GROUP_NORM_EPS).view(B, T, H, N)
        bonus = ((r * k).view(B, T, H, N) * lw.r_k).sum(-1, keepdim=True) * v.view(B, T, H, N)
        return (y + bonus).view(B, T, -1) * g

    def _prepare_triton_time_mix(self):
        """wkv_backend="triton": each layer's parameters for the fused Triton time mix
        (kernels/time_mix_triton.py), used for inputs shorter than FUSED_TRITON_BELOW tokens; else None."""
        if self.wkv_backend != "triton" or self._native_time_mix is not None:
            return None
        from kernels.time_mix_triton import TimeMixParams
        return [TimeMixParams(w0=lw.w0, a0=lw.a0, v0=lw.v0, k_k=lw.k_k, k_a=lw.k_a, r_k=lw.r_k.contiguous(),
                              ln_w=lw.ln_x[0], ln_b=lw.ln_x[1], eps=GROUP_NORM_EPS, log_decay_scale=LOG_DECAY_SCALE)
                for lw in self.layers]

    def _time_mix_triton(self, i, r, w_lora, k, v, a_lora, v_lora, v_first, g, state) -> torch.Tensor:
        """_time_mix_core's math in one Triton launch: the path of CUDA decode with wkv_backend="triton"."""
        from kernels.time_mix_triton import time_mix_triton
        first = v_first if i > 0 else None
        return time_mix_triton(r, w_lora, k, v, a_lora, v_lora, first, g, state.wkv[i],
                               self._triton_time_mix[i], out_dtype=self.dtype)

    def _wkv(self, i, r, log_w, k, v, a, b, state: RNNState) -> torch.Tensor:
        B, T, _ = r.shape
        H, N = self.config.n_head, self.config.head_size
        shape = (B, T, H, N)
        r, log_w, k, v = (t.view(shape) for t in (r, log_w, k, v))
        S = state.wkv[i]                                                      # [B, H, N, N] fp32
        if T == 1 and self._wkv_step_ is not None:
            return self._wkv_step_(r, log_w, k, v, a, b, S)
        y, new_S = self._wkv_seq(r, log_w, k, v, a, b, S)
        S.copy_(new_S)
        return y

    def _channel_mix(self, lw: LayerWeights, xk: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu_(self._proj(xk, lw.ffn_key)).square_()                     # [B, T, F]
        return self._proj(hidden, lw.ffn_value)          # in dt: the residual add widens it


def _few_rows_native(product):
    """``product`` with up to native_decode.GEMV_ROWS rows of x through the native product (plain weights)."""
    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.numel() <= native_decode.GEMV_ROWS * x.shape[-1] and x.is_contiguous():
            return native_decode.gemv(x, w)
        return product(x, w)
    return fn


def _native_mode() -> str:
    try:
        return native.mode()
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def load_model(path: str | Path, strategy: str = "cpu fp32", *, wkv_backend: str = "chunked",
               linear_backend: str | None = None, native_kernels: bool | None = None) -> RWKV7:
    """Load an RWKV-7 checkpoint (.pth, .safetensors or a Hugging Face directory) for inference.

    linear_backend: None/"auto" (oneDNN on CPU when it works, see engine/model/linear.py), "onednn" or "aten".
    native_kernels: None (use the native CPU time-mix kernels when they build, see kernels/native.py), True
    (required) or False (torch ops for the model; the engine's sampler follows GOOSE_NATIVE_KERNELS only).
    """
    try:
        strat = parse_strategy(strategy)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if wkv_backend not in SEQUENCE_BACKENDS:
        raise ModelLoadError(f"unknown WKV-7 backend {wkv_backend!r} for the model; "
                             f"choose one of: {', '.join(SEQUENCE_BACKENDS)}")
    try:
        kernels.get_wkv7(wkv_backend)                   # an optional backend (triton) says now why it cannot load
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        prepare_device(strat)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        linear = select_linear(strat.device, strat.dtype, linear_backend).name
        if strat.quant:
            quant.select_quantized(strat.quant, strat.device, select_linear(strat.device, strat.dtype, linear))
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    _native_mode()                                      # a bad GOOSE_NATIVE_KERNELS fails before the weights load
    sd, config = load_weights(path, strat.quant)        # a GGUF's Q8_0/Q4_0 stay quantized under i8/i4
    sd = for_strategy(sd, strat.quant, strat.dtype, path)   # a quantized file: its codes, dequantized, or refused
    model = RWKV7(sd, config, strat, wkv_backend=wkv_backend, name=Path(path).stem, linear_backend=linear,
                  native_kernels=native_kernels)
    del sd
    release_free_memory()                               # the load's temporaries (quantizing, casting) go back
    return model
