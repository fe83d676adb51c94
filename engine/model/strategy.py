"""Strategy strings in the form RWKV users know ("cpu fp32", "cpu bf16i8", "cuda:1 bf16", ...) parsed into a device,
an activation dtype and, for "i8"/"i4", the quantization of the big matrices (engine/model/quant.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

VALID_FORMS = ("cpu fp32", "cpu bf16", "cpu fp32i8", "cpu bf16i8", "cpu fp32i4", "cpu bf16i4",
               "cuda fp16", "cuda bf16", "cuda fp32", "cuda fp16i8", "cuda bf16i8", "cuda:N <dtype>")
CUDA_QUANTIZED = ("cuda fp16i8", "cuda bf16i8")   # int8 weights on CUDA: the Triton product (kernels/quant_triton.py)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PATTERN = re.compile(r"^\s*(cpu|cuda(?::(\d+))?)\s+(fp32|bf16|fp16)(i8|i4)?\s*$")


@dataclass(frozen=True)
class Strategy:
    """Where the model runs and the dtype of its activations; the recurrent state and norms are always fp32.
    quant: None (float weights in ``dtype``), "i8" (int8 per output channel) or "i4" (4-bit in groups) for the
    projections, the FFN and the head (engine/model/quant.py says which matrices and why); on CUDA only "i8" with
    fp16 or bf16 activations."""
    device: torch.device
    dtype: torch.dtype
    text: str
    quant: str | None = None

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.dtype]


def parse_strategy(text: str) -> Strategy:
    """Parse a strategy string; an invalid one raises ValueError listing the valid forms."""
    if not isinstance(text, str):
        raise ValueError(f"strategy must be a string such as 'cpu fp32', got {type(text).__name__}")
    m = _PATTERN.match(text)
    if m is None:
        hint = ""
        if "->" in text or "*" in text:
            hint = " (layer-split strategies of the rwkv package are not supported for RWKV-7)"
        raise ValueError(f"invalid strategy {text!r}{hint}; valid forms: {', '.join(VALID_FORMS)}")
    device_text, _, dtype_text, quant = m.groups()
    if device_text == "cpu" and dtype_text == "fp16":
        raise ValueError(f"invalid strategy {text!r}: fp16 matmuls on the CPU are slow and lossy; "
                         f"use 'cpu bf16' or 'cpu fp32'. Valid forms: {', '.join(VALID_FORMS)}")
    if quant and device_text != "cpu":
        _check_cuda_quantized(text, dtype_text, quant)
    return Strategy(device=torch.device(device_text), dtype=_DTYPES[dtype_text],
                    text=f"{device_text} {dtype_text}{quant or ''}", quant=quant)


def _check_cuda_quantized(text: str, dtype_text: str, quant: str) -> None:
    """On CUDA only int8 with fp16/bf16 activations exists: int4 has no GPU kernel yet, and fp32 activations would
    multiply int8 weights on the slow fp32 path for no gain over 'cuda fp32'."""
    valid = (f"quantized forms on CUDA: {', '.join(CUDA_QUANTIZED)} (or cuda:N ...); "
             f"valid forms: {', '.join(VALID_FORMS)}")
    if quant != "i8":
        raise ValueError(f"invalid strategy {text!r}: int4 weights ({quant}) are implemented for the CPU only so far; "
                         f"{valid}")
    if dtype_text == "fp32":
        raise ValueError(f"invalid strategy {text!r}: int8 weights on CUDA take fp16 or bf16 activations; {valid}")


def prepare_device(strategy: Strategy) -> None:
    """Check the device exists; on CUDA fp32, turn TF32 off so that fp32 stays exact."""
    if strategy.device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"strategy {strategy.text!r} asks for CUDA, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use a 'cpu ...' strategy")
    index = strategy.device.index or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"strategy {strategy.text!r}: no CUDA device {index} "
                         f"(found {torch.cuda.device_count()})")
    if strategy.dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
