"""The fla-hub Hugging Face layout (names, config.json, tokenizer files) and the tokenizer data a conversion carries.

BlinkDL -> fla names follow the reference notes §3.2 (fla `utils/convert_from_rwkv7.py`); the reverse mapping lives in
engine/formats/checkpoint.py (`to_blinkdl_names`), which every reader already uses.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.text.world import WORLD_EOT_TEXT, WORLD_VOCAB_PATH, read_world_vocab

WORLD_VOCAB_NAME = "rwkv_vocab_v20230424.txt"
# RWKV chat format (reference notes §3.4): "System: ...\n\n", "User: ...\n\n", "Assistant: ...\n\n", then "Assistant:".
# The user line is spelled so llama.cpp's template detection (src/llama-chat.cpp) recognises it as rwkv-world.
CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- 'System: ' + message['content']|trim + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content']|trim + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' and message['content'] is not none -%}"
    "{{- 'Assistant: ' + message['content']|trim + '\\n\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)
MODELING_SHIM = ("from fla.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model  # noqa: F401\n"
                 "# needs flash-linear-attention: pip install flash-linear-attention\n")


# ----------------------------------------------------------------------------------------------- tokenizer data
@dataclass
class TokenizerData:
    """A tokenizer as it travels between formats: a World vocab ({id: bytes}) or a Hugging Face tokenizer.json."""
    kind: str                                   # "world" or "bpe"
    world_vocab: dict[int, bytes] | None = None
    hf_json: str | None = None                  # the tokenizer.json text
    extra_files: dict[str, str] = field(default_factory=dict)   # e.g. tokenizer_config.json beside tokenizer.json
    source: str = ""                            # where it came from, for messages

    @property
    def n_ids(self) -> int:
        """Ids the tokenizer uses (max id + 1)."""
        if self.kind == "world":
            return max(self.world_vocab) + 1
        spec = json.loads(self.hf_json)
        ids = list(spec.get("model", {}).get("vocab", {}).values()) + [t["id"] for t in spec.get("added_tokens", [])]
        return max(ids) + 1


def world_tokenizer_data(path: str | Path | None = None) -> TokenizerData:
    path = Path(path) if path is not None else WORLD_VOCAB_PATH
    return TokenizerData("world", world_vocab=read_world_vocab(path), source=str(path))


def tokenizer_data_from_spec(spec: str) -> TokenizerData | None:
    """'world', 'none', an rwkv_vocab_*.txt, a tokenizer.json, or a directory holding one of them."""
    if spec.strip().lower() == "none":
        return None
    if spec.strip().lower() == "world":
        return world_tokenizer_data()
    path = Path(spec)
    if path.is_dir():
        found = tokenizer_data_in_dir(path)
        if found is None:
            raise ModelLoadError(f"--tokenizer {spec}: directory has neither {WORLD_VOCAB_NAME} nor tokenizer.json")
        return found
    if path.is_file():
        if path.suffix == ".json":
            return _bpe_data(path)
        if path.suffix == ".txt":
            return world_tokenizer_data(path)
        raise ModelLoadError(f"--tokenizer {spec}: expected 'world', 'none', an rwkv_vocab_*.txt, a tokenizer.json "
                             f"or a directory holding one")
    raise ModelLoadError(f"--tokenizer {spec}: no such file or directory")


def tokenizer_data_in_dir(path: Path) -> TokenizerData | None:
    if (path / WORLD_VOCAB_NAME).is_file():
        return world_tokenizer_data(path / WORLD_VOCAB_NAME)
    if (path / "tokenizer.json").is_file():
        return _bpe_data(path / "tokenizer.json")
    return None


def _bpe_data(path: Path) -> TokenizerData:
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read this tokenizer.json: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ModelLoadError(f"{path}: not a Hugging Face tokenizer.json (no 'model' object)")
    extra = {}
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        extra["tokenizer_config.json"] = config.read_text(encoding="utf-8")
    return TokenizerData("bpe", hf_json=text, extra_files=extra, source=str(path))


def render_world_vocab(vocab: dict[int, bytes]) -> str:
    """The rwkv_vocab_*.txt text of {id: bytes}: '<id> <str or bytes literal> <byte length>' per line."""
    lines = []
    for tid in sorted(vocab):
        tok = vocab[tid]
        try:
            literal = repr(tok.decode("utf-8"))
        except UnicodeDecodeError:
            literal = repr(tok)
        lines.append(f"{tid} {literal} {len(tok)}")
    return "\n".join(lines) + "\n"


def write_tokenizer_files(tok: TokenizerData, directory: Path) -> list[str]:
    """Write the tokenizer's files into directory (an HF model dir or a plain one); returns the file names."""
    written = []

    def put(name: str, text: str):
        (directory / name).write_text(text, encoding="utf-8")
        written.append(name)

    if tok.kind == "world":
        put(WORLD_VOCAB_NAME, render_world_vocab(tok.world_vocab))
        put("added_tokens.json", json.dumps({WORLD_EOT_TEXT: 0}, indent=2) + "\n")
        put("special_tokens_map.json", json.dumps(
            {"bos_token": WORLD_EOT_TEXT, "eos_token": "\n\n", "unk_token": WORLD_EOT_TEXT,
             "pad_token": WORLD_EOT_TEXT}, indent=2) + "\n")
        put("tokenizer_config.json", json.dumps(
            {"tokenizer_class": "RwkvTokenizer", "bos_token": WORLD_EOT_TEXT, "eos_token": "\n\n",
             "unk_token": WORLD_EOT_TEXT, "pad_token": WORLD_EOT_TEXT, "add_bos_token": False,
             "use_fast": False, "chat_template": CHAT_TEMPLATE,
             "added_tokens_decoder": {"0": {"content": WORLD_EOT_TEXT, "special": True, "normalized": False,
                                            "lstrip": False, "rstrip": False, "single_word": False}}},
            indent=2) + "\n")
    else:
        put("tokenizer.json", tok.hf_json)
        for name, text in tok.extra_files.items():
            put(name, text)
    return written


# ----------------------------------------------------------------------------------------------- names
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_LN = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}


def fla_name(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """(fla name, tensor in fla shape) of a BlinkDL key; None for tensors fla drops (layer-0 value LoRA)."""
    if key == "emb.weight":
        return "model.embeddings.weight", tensor
    if key.startswith("ln_out."):
        return "model.norm." + key.split(".", 1)[1], tensor
    if key == "head.weight":
        return "lm_head.weight", tensor
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", key)
    if m is None:
        raise ModelLoadError(f"no fla-hub name for tensor {key!r}")
    i, part, name = m.groups()
    p = f"model.layers.{i}."
    if part in _LN:
        return p + _LN[part] + "." + name, tensor
    if part == "ffn":
        return p + "ffn." + name, (tensor.reshape(-1) if name == "x_k" else tensor)
    if name.startswith("x_") or name == "r_k":
        return p + "attn." + name, tensor
    if name in ("k_k", "k_a"):
        return p + "attn." + name, tensor.reshape(-1)
    if name.startswith("ln_x."):
        return p + "attn.g_norm." + name[len("ln_x."):], tensor
    if re.fullmatch(r"[wavg][012]", name):
        if i == "0" and name[0] == "v":
            return None
        if name[1] == "0":
            return p + f"attn.{name[0]}_lora.lora.2.bias", tensor.reshape(-1)
        return p + f"attn.{name[0]}_lora.lora.{0 if name[1] == '1' else 2}.weight", tensor.t()
    if name.endswith(".weight") and name.split(".")[0] in _PROJ:
        return p + "attn." + _PROJ[name.split(".")[0]] + ".weight", tensor
    raise ModelLoadError(f"no fla-hub name for tensor {key!r}")


def hf_config(cfg: ModelConfig, dtype: torch.dtype, tok: TokenizerData | None) -> dict:
    """config.json in the fla-hub layout (keys of fla `configuration_rwkv7.py`)."""
    world = tok is not None and tok.kind == "world"
    return {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_rwkv7.RWKV7Config", "AutoModel": "modeling_rwkv7.RWKV7Model",
                     "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM"},
        "attn_mode": "chunk",
        "hidden_size": cfg.n_embd,
        "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
        "intermediate_size": cfg.dim_ffn,
        "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size,
        "num_heads": None,
        "decay_low_rank_dim": cfg.decay_lora,
        "a_low_rank_dim": cfg.iclr_lora,
        "v_low_rank_dim": cfg.value_lora or None,
        "gate_low_rank_dim": cfg.gate_lora,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "fuse_norm": False,
        "fuse_cross_entropy": True,
        "attn": None,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": 0 if world or tok is None else None,
        "eos_token_id": 0,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def write_hf_extras(directory: Path, cfg: ModelConfig, dtype: torch.dtype, tok: TokenizerData | None) -> None:
    """config.json, generation_config.json, the modeling shim, and the tokenizer files."""
    (directory / "config.json").write_text(json.dumps(hf_config(cfg, dtype, tok), indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}) + "\n")
    (directory / "modeling_rwkv7.py").write_text(MODELING_SHIM)
    if tok is not None:
        write_tokenizer_files(tok, directory)
