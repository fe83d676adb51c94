"""RWKV-LM / RWKV-PEFT state-tuning files: one trained initial WKV state per layer, loaded as an RNNState.

A file holds ``blocks.{i}.att.time_state`` of shape (n_head, head_size, head_size) for every layer and nothing
else. For x070 the tensor is the recurrence's state as-is, rows = value index, columns = key index (the
layout of RNNState.wkv and of the rwkv package's state). RWKV-Runner hands it to the rwkv package untransposed
for version >= 7 and transposed (1, 2) for RWKV-5/6 (backend-python/utils/rwkv.py, commit 64269f0);
tests/test_state_file.py proves Goose's load equals the rwkv package continuing from that state, and that
the transposed load differs. State tuning trains no token-shift vectors, so att_x and ffn_x start at zero.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model.state import RNNState

_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such state file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path}: cannot read this safetensors state file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot read this state file (truncated, corrupt, or it holds objects "
                             f"other than tensors): {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: a state file holds a dict of tensors, found a {type(obj).__name__}")
    return obj


def load_state_file(path: str | Path, config: ModelConfig) -> RNNState:
    """The initial state in a state-tuning file (.pth or .safetensors) for a model of ``config``: a batch of
    one, fp32, on the CPU. Raises ModelLoadError naming the file, key and shapes when it does not fit."""
    path = Path(path)
    sd = _read(path)
    H, N, L = config.n_head, config.head_size, config.n_layer
    layers: dict[int, torch.Tensor] = {}
    for key, value in sd.items():
        m = _KEY.match(str(key))
        if m is None:
            raise ModelLoadError(f"{path}: unknown key {key!r}; a state file holds only "
                                 f"blocks.{{i}}.att.time_state for i in 0..{L - 1}")
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        i = int(m.group(1))
        if i >= L:
            raise ModelLoadError(f"{path}: {key} is for layer {i}, but the model has {L} layers (0..{L - 1})")
        if tuple(value.shape) != (H, N, N):
            raise ModelLoadError(f"{path}: {key} has shape {tuple(value.shape)}, the model needs ({H}, {N}, {N}) "
                                 f"(n_head, head_size, head_size)")
        if not value.is_floating_point():
            raise ModelLoadError(f"{path}: {key} has dtype {value.dtype}, expected a float tensor")
        if not torch.isfinite(value).all():
            raise ModelLoadError(f"{path}: {key} holds NaN or infinite values")
        layers[i] = value
    missing = [i for i in range(L) if i not in layers]
    if missing:
        raise ModelLoadError(f"{path}: no blocks.{{i}}.att.time_state for layer(s) {missing} "
                             f"(the model has {L} layers)")
    state = RNNState.zeros(config, 1)
    for i in range(L):
        state.wkv[i][0].copy_(layers[i].to(torch.float32))
    return state


def save_state_file(path: str | Path, state: RNNState) -> None:
    """Write the WKV part of a batch-of-one state as a state-tuning file (.pth or .safetensors).

    The token-shift vectors are not part of the format and are dropped: loading gives them back as zeros."""
    if state.batch_size != 1:
        raise ValueError(f"save_state_file takes a batch of one, got {state.batch_size} sequences")
    sd = {f"blocks.{i}.att.time_state": w[0].detach().to("cpu", torch.float32).contiguous()
          for i, w in enumerate(state.wkv)}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)


def state_digest(state: RNNState) -> str:
    """SHA-256 hex of a state's fp32 values (every tensor, in RNNState order): name stored states by the initial
    state's content (e.g. StateKey.initial = f"{name}:{digest[:16]}"), so editing a state file never reuses
    conversations that started from its old content."""
    h = hashlib.sha256()
    for t in state.tensors():
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
