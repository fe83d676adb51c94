"""RWKV-7 (x070, "Goose") in train mode: full-sequence forward from a zero state, BlinkDL parameter names.

``RWKV7.state_dict()`` has exactly the keys and shapes of a BlinkDL ``.pth`` (rwkv7-reference.md section 3.1), so
the inference engine loads an exported checkpoint unchanged. Layer 0 has no ``v0/v1/v2`` (the value residual
starts at layer 1). The WKV recurrence runs through the project's differentiable chunked kernel
(``kernels.get_wkv7("chunked")``), never a per-token Python loop.

Math (rwkv7-reference.md section 1): token shift with the ln1/ln2-normalized previous token (zero before the
first token), log-decay ``-e^{-0.5} * sigmoid(w0 + tanh(x_w @ w1) @ w2)``, ``a = -kk``, ``b = kk * alpha``,
GroupNorm ``ln_x`` with eps 64e-5 (whatever the head size), the ``r_k`` bonus, and the sigmoid-between gate.
Initialisation follows RWKV-LM ``RWKV-v7/train_temp``: tiny embedding, zero att.output and ffn.value, per-channel
decay spread, orthogonal LoRA second factors, zero LoRA first factors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import get_wkv7

LOG_DECAY_SCALE = -0.6065306597126334  # -e^{-0.5}
# GroupNorm eps of ln_x. RWKV-LM trains with head_size * 1e-5, but rwkv-pip and llama.cpp hard-code 64e-5 at
# inference. We use 64e-5 for every head size so that any engine reproduces this model exactly.
LN_X_EPS = 64e-5


def _lora_rank(C: int, factor: float, power: float = 0.5) -> int:
    return max(32, int(round(factor * (C ** power) / 32) * 32))


@dataclass
class RWKV7Config:
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 192
    head_size: int = 32
    dim_ffn: int = 0        # 0 -> 4 * n_embd
    d_decay: int = 0        # 0 -> RWKV-LM formulas (at least 32)
    d_aaa: int = 0
    d_mv: int = 0
    d_gate: int = 0
    chunk_len: int = 16     # WKV chunk length for training
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        C = self.n_embd
        if C % self.head_size:
            raise ValueError(f"n_embd {C} is not a multiple of head_size {self.head_size}")
        self.dim_ffn = self.dim_ffn or 4 * C
        self.d_decay = self.d_decay or _lora_rank(C, 2.5)
        self.d_aaa = self.d_aaa or _lora_rank(C, 2.5)
        self.d_mv = self.d_mv or _lora_rank(C, 1.7)
        self.d_gate = self.d_gate or _lora_rank(C, 0.6, 0.8)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra", None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RWKV7Config":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known)


def _ortho(shape: tuple[int, int], scale: float) -> torch.Tensor:
    x = torch.empty(shape)
    gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
    nn.init.orthogonal_(x, gain=gain * scale)
    return x


def _token_shift(x: torch.Tensor) -> torch.Tensor:
    """previous token minus current token, with a zero vector before the first token (zero state)."""
    return F.pad(x, (0, 0, 1, -1)) - x


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.chunk_len = cfg.chunk_len
        C, N, H, L = cfg.n_embd, cfg.head_size, cfg.n_head, cfg.n_layer
        self.n_head, self.head_size = H, N
        ratio_0_to_1 = layer_id / max(L - 1, 1)
        ratio_1_to_almost0 = 1.0 - layer_id / L
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_r = nn.Parameter(1.0 - ddd.pow(0.2 * ratio_1_to_almost0))
        self.x_w = nn.Parameter(1.0 - ddd.pow(0.9 * ratio_1_to_almost0))
        self.x_k = nn.Parameter(1.0 - ddd.pow(0.7 * ratio_1_to_almost0))
        self.x_v = nn.Parameter(1.0 - ddd.pow(0.7 * ratio_1_to_almost0))
        self.x_a = nn.Parameter(1.0 - ddd.pow(0.9 * ratio_1_to_almost0))
        self.x_g = nn.Parameter(1.0 - ddd.pow(0.2 * ratio_1_to_almost0))

        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + 1 * ratio_0_to_1 ** 0.3)
        # decay pre-activation spread across channels (slow to fast), zigzag within each head
        self.w0 = nn.Parameter((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, cfg.d_decay))
        self.w2 = nn.Parameter(_ortho((cfg.d_decay, C), 0.1))
        self.a0 = nn.Parameter((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, cfg.d_aaa))
        self.a2 = nn.Parameter(_ortho((cfg.d_aaa, C), 0.1))
        if layer_id > 0:
            self.v0 = nn.Parameter((0.73 - linear * 0.4).view(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, cfg.d_mv))
            self.v2 = nn.Parameter(_ortho((cfg.d_mv, C), 0.1))
        self.g1 = nn.Parameter(torch.zeros(C, cfg.d_gate))
        self.g2 = nn.Parameter(_ortho((cfg.d_gate, C), 0.1))
        self.k_k = nn.Parameter((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a = nn.Parameter(torch.full((1, 1, C), 1.02))
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        s = C ** -0.5
        nn.init.uniform_(self.receptance.weight, -0.5 * s, 0.5 * s)
        nn.init.uniform_(self.key.weight, -0.05 * s, 0.05 * s)
        nn.init.uniform_(self.value.weight, -0.5 * s, 0.5 * s)
        nn.init.zeros_(self.output.weight)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)
        with torch.no_grad():
            self.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, wkv):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _token_shift(x)
        xr, xw = x + xx * self.x_r, x + xx * self.x_w
        xk, xv = x + xx * self.x_k, x + xx * self.x_v
        xa, xg = x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        z = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        alpha = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (alpha - 1) * self.k_a)
        logw = LOG_DECAY_SCALE * torch.sigmoid(z.float())

        r4, k4, v4 = r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N)
        state = torch.zeros(B, H, N, N, dtype=torch.float32, device=x.device)
        y, _ = wkv(r4.float(), logw.view(B, T, H, N), k4.float(), v4.float(), -kk.float(),
                   (kk * alpha.view(B, T, H, N)).float(), state, chunk_len=self.chunk_len)
        y = y.to(x.dtype)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = ((r4 * k4 * self.r_k).sum(dim=-1, keepdim=True) * v4).view(B, T, C)
        return self.output((y + bonus) * g), v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        ratio_1_to_almost0 = 1.0 - layer_id / cfg.n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_k = nn.Parameter(1.0 - ddd.pow(ratio_1_to_almost0 ** 4))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)
        nn.init.uniform_(self.key.weight, -0.5 * C ** -0.5, 0.5 * C ** -0.5)
        nn.init.zeros_(self.value.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x + _token_shift(x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2)


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)


class RWKV7(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.cfg = cfg
        C, V = cfg.n_embd, cfg.vocab_size
        self.emb = nn.Embedding(V, C)
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(_ortho((V, C), 0.5))
        self.wkv = get_wkv7("chunked")

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final ln_out output ``[B, T, C]`` for tokens ``[B, T]`` from a zero state."""
        x = self.blocks[0].ln0(self.emb(idx))
        v_first = None
        for block in self.blocks:
            dx, v_first = block.att(block.ln1(x), v_first, self.wkv)
            x = x + dx
            x = x + block.ffn(block.ln2(x))
        return self.ln_out(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for tokens ``[B, T]`` from a zero state."""
        return self.head(self.hidden(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.forward(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_ids: tuple[int, ...] = (0,), stop_text=None, decode=None,
                 generator: torch.Generator | None = None) -> list[int]:
        """Simple sampler for model cards: full-sequence forward from a zero state at every step.

        ``temperature == 0`` is greedy. Stops on a token in ``stop_ids`` or when ``decode(new_ids)`` contains one
        of ``stop_text``. Returns the new token ids (a stop token is not included)."""
        ids = list(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.forward(torch.tensor([ids]))[0, -1].float()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    keep = sp.cumsum(0) - sp < top_p
                    probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
                    probs = probs / probs.sum()
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            if nxt in stop_ids:
                break
            ids.append(nxt)
            new.append(nxt)
            if stop_text and decode is not None:
                text = decode(new)
                if any(s in text for s in stop_text):
                    break
        return new


def blinkdl_shapes(cfg: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """The exact BlinkDL x070 key -> shape layout for ``cfg`` (used by tests and the exporter)."""
    C, V, F_, H, N = cfg.n_embd, cfg.vocab_size, cfg.dim_ffn, cfg.n_head, cfg.head_size
    out: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            out[p + ln + ".weight"] = (C,)
            out[p + ln + ".bias"] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0"):
            out[p + "att." + name] = (1, 1, C)
        out[p + "att.w1"], out[p + "att.w2"] = (C, cfg.d_decay), (cfg.d_decay, C)
        out[p + "att.a1"], out[p + "att.a2"] = (C, cfg.d_aaa), (cfg.d_aaa, C)
        if i > 0:
            out[p + "att.v0"] = (1, 1, C)
            out[p + "att.v1"], out[p + "att.v2"] = (C, cfg.d_mv), (cfg.d_mv, C)
        out[p + "att.g1"], out[p + "att.g2"] = (C, cfg.d_gate), (cfg.d_gate, C)
        out[p + "att.k_k"] = (1, 1, C)
        out[p + "att.k_a"] = (1, 1, C)
        out[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            out[p + f"att.{name}.weight"] = (C, C)
        out[p + "att.ln_x.weight"] = (C,)
        out[p + "att.ln_x.bias"] = (C,)
        out[p + "ffn.x_k"] = (1, 1, C)
        out[p + "ffn.key.weight"] = (F_, C)
        out[p + "ffn.value.weight"] = (C, F_)
    out["ln_out.weight"], out["ln_out.bias"] = (C,), (C,)
    out["head.weight"] = (V, C)
    return out


def config_from_state_dict(sd: dict) -> RWKV7Config:
    """Infer the architecture from BlinkDL tensor shapes."""
    V, C = sd["emb.weight"].shape
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    _, N = sd["blocks.0.att.r_k"].shape
    v1 = sd.get("blocks.1.att.v1")
    return RWKV7Config(
        vocab_size=V, n_layer=L, n_embd=C, head_size=N,
        dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        d_decay=sd["blocks.0.att.w1"].shape[1], d_aaa=sd["blocks.0.att.a1"].shape[1],
        d_mv=v1.shape[1] if v1 is not None else 0, d_gate=sd["blocks.0.att.g1"].shape[1],
    )


def load_safetensors_model(path, chunk_len: int = 64) -> RWKV7:
    """Load an exported BlinkDL-layout safetensors file into the train-mode model (fp32)."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    cfg = config_from_state_dict(sd)
    cfg.chunk_len = chunk_len
    model = RWKV7(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()
