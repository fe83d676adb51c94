"""Shared fixtures: random checkpoints with the official key names, and the rwkv package as the oracle."""
from __future__ import annotations

import os

os.environ.setdefault("RWKV_V7_ON", "1")      # the rwkv package reads these at import
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.random_checkpoint import CheckpointShape, write_checkpoint  # noqa: E402

# Shapes chosen to break assumptions: C not a multiple of 256, F != 4C, unequal LoRA ranks, head size 32,
# layer-0 value LoRA present and absent.
PARITY_SHAPES = {
    "c192-f500-v0absent": CheckpointShape(n_layer=3, n_embd=192, head_size=64, vocab_size=777, dim_ffn=500,
                                          decay_lora=16, iclr_lora=24, value_lora=8, gate_lora=40,
                                          layer0_value_lora=False),
    "c128-n32-v0present": CheckpointShape(n_layer=2, n_embd=128, head_size=32, vocab_size=512, dim_ffn=448,
                                          decay_lora=32, iclr_lora=16, value_lora=24, gate_lora=64,
                                          layer0_value_lora=True),
}


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def tiny_pth(ckpt_dir):
    """A small random checkpoint (.pth) shared by the engine tests."""
    path = ckpt_dir / "tiny.pth"
    write_checkpoint(path, PARITY_SHAPES["c192-f500-v0absent"], seed=1)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_pth):
    from engine import load_model
    return load_model(tiny_pth, "cpu fp32")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
