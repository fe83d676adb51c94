"""RWKV-7 x070 inference model: one forward for prefill and decode, fp32 state and norms, matmuls in the strategy dtype."""
from __future__ import annotations

from dataclasses import dataclass
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from kernels import native
from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model.allocator import release_free_memory
from engine.model.linear import select_linear
from engine.model import quant
from engine.model.state import RNNState
from engine.model.strategy import Strategy, parse_strategy, prepare_device
from engine.formats.checkpoint import load_weights, weights_identity

LOG_DECAY_SCALE = -0.6065306597126334   # -exp(-0.5): log-decay = LOG_DECAY_SCALE * sigmoid(z), in [-0.607, 0)
LN_EPS = 1e-5
GROUP_NORM_EPS = 64e-5                  # head_size * 1e-5 in every released model (RWKV-LM "notice eps value")
log = logging.getLogger("goose.engine")
SEQUENCE_BACKENDS = ("chunked", "reference", "triton")  # kernels for T > 1 when the native time mix is off
STEP_BACKENDS = {"chunked": "step_", "triton": "triton_step_"}  # decode (T = 1); reference uses itself


Lora = tuple[torch.Tensor, torch.Tensor]   # (plain [out, in] for F.linear, the same prepared for the backend)


@dataclass
class LayerWeights:
    """One block's tensors, prepared once: vectors fp32, matrices in the matmul dtype laid out [out, in] for
    ``linear(x, W)`` (the checkpoint's own layout for projections; the LoRA factors are transposed once).
    LoRA factors are (plain, prepared) pairs: see RWKV7._lora."""
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    att_mix: torch.Tensor                 # [6, 1, 1, C] fp32: x_r, x_k, x_v, x_w, x_a, x_g
    w_r: torch.Tensor                     # [A, C] receptance
    w_k: torch.Tensor                     # [A, C] key
    w_v: torch.Tensor                     # [A, C] value
    w_out: torch.Tensor                   # [C, A]
    w0: torch.Tensor                      # [A] fp32
    w1: Lora                              # [Dw, C]
    w2: Lora                              # [A, Dw]
    a0: torch.Tensor
    a1: Lora
    a2: Lora
    v0: torch.Tensor | None               # value residual, None at layer 0
    v1: Lora | None
    v2: Lora | None
    g1: Lora
    g2: Lora
    k_k: torch.Tensor                     # [A] fp32
    k_a: torch.Tensor                     # [A] fp32
    r_k: torch.Tensor                     # [H, N] fp32
    ln_x: tuple[torch.Tensor, torch.Tensor]
    ffn_mix: torch.Tensor                 # [C] fp32
    ffn_key: torch.Tensor                 # [F, C]
    ffn_value: torch.Tensor               # [C, F]


def _owned(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """t, copied if it still shares memory with the loaded checkpoint: the vectors are small, and once no
    model tensor refers to the memory-mapped file, the mapping (the whole file) is released after loading."""
    return t.clone() if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else t


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

        def f32(key: str) -> torch.Tensor:
            return _owned(sd[key].to(device=self.device, dtype=torch.float32).contiguous(), sd[key])

        def mat(key: str):                                  # quantized in fp32 by chunks of rows
            if quant.family(key) in quantized:
                return proj.prepare(sd[key])                # a GGUF Q8_0/Q4_0 matrix is kept as it is
            w = sd[key].dequantize() if quant.kind_of(sd[key]) else sd[key]
            return pack(w.to(device=self.device, dtype=self.dtype).contiguous())

        def lora(key: str) -> Lora:                         # stored [in, out]: transposed once
            plain = _owned(sd[key].to(device=self.device, dtype=self.dtype).t().contiguous(), sd[key])
            prepared = pack(plain)
            return (plain if linear.small_rows else prepared), prepared    # one copy unless both are used
        C = config.n_embd
        emb = F.layer_norm(f32("emb.weight"), (C,), f32("blocks.0.ln0.weight"), f32("blocks.0.ln0.bias"), LN_EPS)
        self.emb = emb.to(self.dtype)                       # [V, C], ln0 folded in
        self.ln_out = (f32("ln_out.weight"), f32("ln_out.bias"))
        self.head = mat("head.weight")                      # [V, C]
        self.layers = [self._prepare_layer(i, f32, mat, lora) for i in range(config.n_layer)]
        self._native_time_mix = self._prepare_native(native_kernels)
        self.decode_kernel = ("native" if self._native_time_mix is not None
                              else "triton" if wkv_backend == "triton" else "torch")

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

    @staticmethod
    def _prepare_layer(i, f32, mat, lora) -> LayerWeights:
        # projections keep the checkpoint's [out, in]; LoRA factors (stored [in, out]) are transposed
        p = f"blocks.{i}."
        vec = lambda key: f32(p + key).reshape(-1)  # noqa: E731
        att_mix = torch.stack([vec(f"att.x_{c}") for c in "rkvwag"]).view(6, 1, 1, -1)
        has_v = i > 0
        return LayerWeights(
            ln1=(vec("ln1.weight"), vec("ln1.bias")), ln2=(vec("ln2.weight"), vec("ln2.bias")),
            att_mix=att_mix,
            w_r=mat(p + "att.receptance.weight"), w_k=mat(p + "att.key.weight"), w_v=mat(p + "att.value.weight"),
            w_out=mat(p + "att.output.weight"),
            w0=vec("att.w0"), w1=lora(p + "att.w1"), w2=lora(p + "att.w2"),
            a0=vec("att.a0"), a1=lora(p + "att.a1"), a2=lora(p + "att.a2"),
            v0=vec("att.v0") if has_v else None, v1=lora(p + "att.v1") if has_v else None,
            v2=lora(p + "att.v2") if has_v else None,
            g1=lora(p + "att.g1"), g2=lora(p + "att.g2"),
            k_k=vec("att.k_k"), k_a=vec("att.k_a"), r_k=f32(p + "att.r_k"),
            ln_x=(vec("att.ln_x.weight"), vec("att.ln_x.bias")),
            ffn_mix=vec("ffn.x_k"), ffn_key=mat(p + "ffn.key.weight"), ffn_value=mat(p + "ffn.value.weight"),
        )

    # ------------------------------------------------------------------------------------------ public API
    def zero_state(self, batch_size: int = 1) -> RNNState:
        return RNNState.zeros(self.config, batch_size, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: RNNState | None = None, full_output: bool = False):
        """Advance ``state`` by the T tokens of each row and return (logits, state).

        tokens: LongTensor [B, T] (T >= 1). The state is updated in place and returned; clone() it first to
        keep a snapshot. logits: float32 [B, T, V] with full_output, else [B, V] for the last position.
        """
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
        for i, lw in enumerate(self.layers):
            h = F.layer_norm(x, (self.config.n_embd,), lw.ln1[0], lw.ln1[1], LN_EPS)
            dx, v_first = self._time_mix(i, lw, h, state, v_first)
            x = x + dx
            h = F.layer_norm(x, (self.config.n_embd,), lw.ln2[0], lw.ln2[1], LN_EPS)
            x = x + self._channel_mix(i, lw, h, state)
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

    def _shift(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        # token shift: the previous token's normalized input, from the state for the first position
        if h.shape[1] == 1:
            return prev.unsqueeze(1)
        return torch.cat((prev.unsqueeze(1), h[:, :-1]), dim=1)

    def _time_mix(self, i: int, lw: LayerWeights, h: torch.Tensor, state: RNNState, v_first):
        B, T, C = h.shape
        dt = self.dtype
        if self._native_time_mix is not None:          # CPU, so dt is float32 or bfloat16
            mixed = native.shift_mix(h, state.att_x[i], lw.att_mix.view(6, C), dt)       # [6, B, T, C]
        else:
            mixed = torch.addcmul(h, self._shift(h, state.att_x[i]) - h, lw.att_mix).to(dt)
        state.att_x[i].copy_(h[:, -1])
        lin = self._proj
        xr, xk, xv, xw, xa, xg = mixed.unbind(0)
        S = state.wkv[i]
        fused = self._native_time_mix is not None and S.is_contiguous()
        # the native kernel takes the projections in their dtype (it widens bf16 itself): no float copies
        rows = (lambda t: t) if fused else (lambda t: t.float())  # noqa: E731
        r, k, v = rows(lin(xr, lw.w_r)), rows(lin(xk, lw.w_k)), rows(lin(xv, lw.w_v))       # [B, T, A]
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

    def _channel_mix(self, i: int, lw: LayerWeights, h: torch.Tensor, state: RNNState) -> torch.Tensor:
        if self._native_time_mix is not None:
            xk = native.shift_mix(h, state.ffn_x[i], lw.ffn_mix.view(1, -1), self.dtype)[0]
        else:
            xk = torch.addcmul(h, self._shift(h, state.ffn_x[i]) - h, lw.ffn_mix).to(self.dtype)
        state.ffn_x[i].copy_(h[:, -1])
        hidden = torch.relu_(self._proj(xk, lw.ffn_key)).square_()                     # [B, T, F]
        return self._proj(hidden, lw.ffn_value)          # in dt: the residual add widens it


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
    model = RWKV7(sd, config, strat, wkv_backend=wkv_backend, name=Path(path).stem, linear_backend=linear,
                  native_kernels=native_kernels)
    del sd
    release_free_memory()                               # the load's temporaries (quantizing, casting) go back
    return model
