"""GGUF (llama.cpp) for RWKV-7, writing: arch ``rwkv7`` exactly as llama.cpp loads it, with the tensor plan, the
dtype policy and the tokenizer export; gguf.py reads it back.

Layout, metadata keys and the tensor dtype policy follow the reference notes §3.3 (llama.cpp `conversion/rwkv.py`,
`conversion/base.py`, `src/models/rwkv7.cpp`). numpy shapes are used throughout; gguf-py reverses them to ggml order.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.formats.gguf import ARCH, escape_rwkv_token, require_gguf
from engine.formats.hf import CHAT_TEMPLATE, TokenizerData
from engine.text.hf_tokenizer import component_types

CONTEXT_LENGTH = 1048576              # RWKV is not context limited; llama.cpp's converter writes this
LAYER_NORM_EPS = 1e-5
_FORCED_F32 = ("time_mix_w1.weight", "time_mix_w2.weight", "time_mix_lerp_fused.weight")
_EOT_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|end|>")


# ----------------------------------------------------------------------------------------------- writing
Getter = Callable[[str], torch.Tensor]


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], Callable[[Getter], torch.Tensor]]]:
    """(GGUF name, numpy shape, builder from BlinkDL tensors) for every tensor llama.cpp's rwkv7 loader wants."""
    C, V, F, L = cfg.n_embd, cfg.vocab_size, cfg.dim_ffn, cfg.n_layer
    plan: list = []

    def add(name, shape, fn):
        plan.append((name, tuple(shape), fn))

    def vec(key):
        return lambda g: g(key).reshape(-1)

    def same(key):
        return lambda g: g(key)

    def tr(key):
        return lambda g: g(key).t()

    add("token_embd.weight", (V, C), same("emb.weight"))
    add("token_embd_norm.weight", (C,), vec("blocks.0.ln0.weight"))
    add("token_embd_norm.bias", (C,), vec("blocks.0.ln0.bias"))
    for i in range(L):
        b, s = f"blk.{i}.", f"blocks.{i}."
        for gg, ours in (("attn_norm", "ln1"), ("attn_norm_2", "ln2")):
            add(f"{b}{gg}.weight", (C,), vec(f"{s}{ours}.weight"))
            add(f"{b}{gg}.bias", (C,), vec(f"{s}{ours}.bias"))
        add(f"{b}time_mix_lerp_fused.weight", (6, 1, 1, C),
            lambda g, s=s: torch.stack([g(f"{s}att.x_{c}").reshape(1, 1, C) for c in "rwkvag"]))
        ranks = {"w": cfg.decay_lora, "a": cfg.iclr_lora, "v": cfg.value_lora, "g": cfg.gate_lora}
        for x in "wavg":
            src = "a" if (x == "v" and i == 0) else x      # layer 0: llama.cpp wants v0/v1/v2 = copies of a0/a1/a2
            rank = ranks[src]
            if x != "g":
                add(f"{b}time_mix_{x}0.weight", (C,), vec(f"{s}att.{src}0"))
            add(f"{b}time_mix_{x}1.weight", (rank, C), tr(f"{s}att.{src}1"))
            add(f"{b}time_mix_{x}2.weight", (C, rank), tr(f"{s}att.{src}2"))
        for x in ("k_k", "k_a", "r_k"):
            add(f"{b}time_mix_{x}.weight", (C,), vec(f"{s}att.{x}"))
        for x in ("key", "value", "receptance", "output"):
            add(f"{b}time_mix_{x}.weight", (C, C), same(f"{s}att.{x}.weight"))
        add(f"{b}time_mix_ln.weight", (C,), vec(f"{s}att.ln_x.weight"))
        add(f"{b}time_mix_ln.bias", (C,), vec(f"{s}att.ln_x.bias"))
        add(f"{b}channel_mix_lerp_k.weight", (C,), vec(f"{s}ffn.x_k"))
        add(f"{b}channel_mix_key.weight", (F, C), same(f"{s}ffn.key.weight"))
        add(f"{b}channel_mix_value.weight", (C, F), same(f"{s}ffn.value.weight"))
    add("output_norm.weight", (C,), vec("ln_out.weight"))
    add("output_norm.bias", (C,), vec("ln_out.bias"))
    add("output.weight", (V, C), same("head.weight"))
    return plan


def tensor_qtype(name: str, shape: tuple[int, ...], ftype):
    """llama.cpp's dtype policy (conversion/base.py prepare_tensors): 1-D, norms, biases, w1/w2 and the fused lerp stay
    F32; other matrices take the file type; a row length that is not a multiple of the Q8_0/Q4_0 block (32) falls back
    to F16. Q4_0 is ggml's layout (gguf.quants): per 32 weights an fp16 d and 16 bytes, weight j in the low nibble of
    byte j and weight j + 16 in the high one, value (q - 8) * d."""
    gguf = require_gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name.endswith(_FORCED_F32):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[ftype][0]
    if block > 1 and shape[-1] % block:
        return Q.F16
    return ftype


def tensor_nbytes(shape: tuple[int, ...], qtype) -> int:
    gguf = require_gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _quantize(t: torch.Tensor, qtype) -> np.ndarray:
    gguf = require_gguf()
    Q = gguf.GGMLQuantizationType
    t = t.detach().contiguous()
    if qtype == Q.F16 and t.dtype == torch.float16:
        return t.numpy()
    if qtype == Q.BF16 and t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(t.float().numpy(), qtype)


def file_type_of(qtype) -> int:
    gguf = require_gguf()
    Q, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {Q.F32: FT.ALL_F32, Q.F16: FT.MOSTLY_F16, Q.BF16: FT.MOSTLY_BF16, Q.Q8_0: FT.MOSTLY_Q8_0,
            Q.Q4_0: FT.MOSTLY_Q4_0}[qtype]


def write_gguf(path: str | Path, cfg: ModelConfig, get: Getter, *, ftype, tokenizer: TokenizerData | None,
               name: str = "", progress: Callable[[int], None] | None = None) -> list[tuple[str, str, tuple]]:
    """Write a GGUF tensor by tensor (one tensor in memory at a time). Returns (name, type, numpy shape) per tensor."""
    gguf = require_gguf()
    if cfg.dim_att != cfg.n_embd:
        raise ModelLoadError(f"llama.cpp's rwkv7 needs n_head * head_size == n_embd; this model has "
                             f"{cfg.n_head} x {cfg.head_size} != {cfg.n_embd}")
    w = gguf.GGUFWriter(str(path), ARCH)
    if name:
        w.add_name(name)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_wkv_head_size(cfg.head_size)
    w.add_decay_lora_rank(cfg.decay_lora)
    w.add_iclr_lora_rank(cfg.iclr_lora)
    w.add_value_residual_mix_lora_rank(cfg.value_lora)
    w.add_gate_lora_rank(cfg.gate_lora)
    w.add_feed_forward_length(cfg.dim_ffn)
    w.add_head_count(0)                     # required by llama.cpp, unused
    w.add_token_shift_count(2)              # the rwkv7 graph asserts 2; written explicitly, not left to a default
    w.add_file_type(file_type_of(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, tokenizer, cfg.vocab_size)
    plan = [(n, shape, fn, tensor_qtype(n, shape, ftype)) for n, shape, fn in tensor_plan(cfg)]
    for n, shape, _, qtype in plan:
        w.add_tensor_info(n, shape, np.dtype(np.float32), tensor_nbytes(shape, qtype), raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for n, shape, fn, qtype in plan:
            t = fn(get)
            if tuple(t.shape) != shape:
                raise ModelLoadError(f"tensor {n}: built shape {list(t.shape)}, expected {list(shape)}")
            data = _quantize(t, qtype)
            w.write_tensor_data(data)
            if progress is not None:
                progress(data.nbytes)
            del t, data
    finally:
        w.close()
    return [(n, qtype.name, shape) for n, shape, _, qtype in plan]


# ----------------------------------------------------------------------------------------------- tokenizer
def add_tokenizer(w, tok: TokenizerData | None, vocab_size: int) -> None:
    gguf = require_gguf()
    TT = gguf.TokenType
    if tok is None:
        w.add_tokenizer_model("none")
        w.add_vocab_size(vocab_size)
        return
    if tok.n_ids > vocab_size:
        raise ModelLoadError(f"tokenizer {tok.source} uses ids up to {tok.n_ids - 1} but the model's vocabulary has "
                             f"only {vocab_size} rows; pass --tokenizer none or the model's own tokenizer")
    tokens: list[str] = []
    types: list[int] = []
    if tok.kind == "world":
        vocab = tok.world_vocab
        for i in range(vocab_size):
            if i == 0:
                tokens.append("<s>"), types.append(TT.CONTROL)
            elif i in vocab:
                tokens.append(escape_rwkv_token(vocab[i])), types.append(TT.NORMAL)
            else:
                tokens.append(f"[PAD{i}]"), types.append(TT.UNUSED)
        w.add_tokenizer_model("rwkv")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        eot = next((i for i, t in vocab.items() if t == b"\n\n"), None)
        if eot is not None:
            w.add_eot_token_id(eot)          # llama.cpp's "hack" so chat stops at a blank line
        w.add_chat_template(CHAT_TEMPLATE)
        return
    spec = json.loads(tok.hf_json)
    model = spec["model"]
    types_in = component_types(spec.get("pre_tokenizer")) | component_types(spec.get("decoder"))
    if model.get("type") != "BPE" or "ByteLevel" not in types_in:
        raise ModelLoadError(f"tokenizer {tok.source}: only byte-level BPE tokenizer.json files can be embedded in "
                             f"GGUF (found model type {model.get('type')!r}); pass --tokenizer none")
    vocab_by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
        elif i in vocab_by_id:
            tokens.append(vocab_by_id[i]), types.append(TT.NORMAL)
        else:
            tokens.append(f"[PAD{i}]"), types.append(TT.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot = _bpe_eot(spec, tok)
    if eot is not None:
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
    w.add_add_bos_token(False)
    config = json.loads(tok.extra_files.get("tokenizer_config.json", "{}") or "{}")
    w.add_chat_template(config.get("chat_template") if isinstance(config.get("chat_template"), str)
                        else CHAT_TEMPLATE)
    w.add_string(gguf.Keys.Tokenizer.HF_JSON, tok.hf_json)   # the exact file, for export back


GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"


def bpe_pretokenizer_note(tok: TokenizerData | None) -> str | None:
    """A warning when a BPE tokenizer splits text with a regex other than GPT-2's, which llama.cpp will use
    (tokenizer.ggml.pre = "gpt-2"): token ids then still match, but llama.cpp may tokenize some text differently."""
    if tok is None or tok.kind != "bpe":
        return None
    pre = json.loads(tok.hf_json).get("pre_tokenizer") or {}
    patterns = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Split":
                pattern = node.get("pattern", {})
                patterns.append(pattern.get("Regex", pattern.get("String")) if isinstance(pattern, dict) else pattern)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(pre)
    if all(p == GPT2_SPLIT for p in patterns):
        return None
    return (f"note: {tok.source} pre-tokenizes with {patterns[0]!r}; llama.cpp will use the GPT-2 regex "
            f"(tokenizer.ggml.pre = 'gpt-2'), so its own tokenization of some text (e.g. runs of newlines) can differ")


def _bpe_eot(spec: dict, tok: TokenizerData) -> int | None:
    by_content = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    by_content.update({k: v for k, v in spec["model"]["vocab"].items() if k in _EOT_TEXT})
    eos = json.loads(tok.extra_files.get("tokenizer_config.json", "{}") or "{}").get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    for text in ([eos] if isinstance(eos, str) else []) + list(_EOT_TEXT):
        if text in by_content:
            return by_content[text]
    return None
