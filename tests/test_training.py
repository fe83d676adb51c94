"""Training-side tests: corpus extraction, chat data, the train-mode model, the training loop and the shipped model.

All CPU, a few seconds each. The shipped-model tests skip until models/rwkv7-austen/ has been exported.
"""
from __future__ import annotations

import gzip
import json
import math
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from training import chat_data, extract_corpus
from training.model import RWKV7, RWKV7Config, blinkdl_shapes, config_from_state_dict

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "rwkv7-austen"
SHIPPED_TOKENIZER = MODEL_DIR / "tokenizer.json"


# ----------------------------------------------------------------------------------------------------------
# a tiny R lazy-load database, written the way R writes one (XDR serialization, zlib chunks, gzip'd index)
# ----------------------------------------------------------------------------------------------------------
def _i(*xs: int) -> bytes:
    return struct.pack(f">{len(xs)}i", *xs)


def _header() -> bytes:
    return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8"


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return _i(9, -1)                                    # NA_character_
    raw = s.encode("utf-8")
    levels = 64 if s.isascii() else 8                       # ASCII_MASK / UTF8_MASK
    return _i(9 | (levels << 12), len(raw)) + raw


def _strsxp(items) -> bytes:
    return _i(16, len(items)) + b"".join(_charsxp(s) for s in items)


def _names_attr(names, first_use: bool) -> bytes:
    # pairlist (LISTSXP with a tag) holding names = <STRSXP>; the "names" symbol is a back-reference after its
    # first appearance, as R writes it
    sym = _i(1) + _charsxp("names") if first_use else _i((1 << 8) | 255)
    return _i(2 | (1 << 10)) + sym + _strsxp(names) + _i(254)


def _named_list(values: list[bytes], names, first_use: bool) -> bytes:
    return _i(19 | (1 << 9), len(values)) + b"".join(values) + _names_attr(names, first_use)


def _chunk(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + zlib.compress(payload)


def write_fake_rdb(data_dir: Path, vectors: dict[str, list]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    rdb = b""
    index = []
    for name, lines in vectors.items():
        blob = _chunk(_header() + _strsxp(lines))
        index.append((len(rdb), len(blob)))
        rdb += blob
    (data_dir / "Rdata.rdb").write_bytes(rdb)
    variables = _named_list([_i(13, 2, off, n) for off, n in index], list(vectors), first_use=True)
    references = _i(19, 0)
    compressed = _i(10, 1, 1)
    rdx = _header() + _named_list([variables, references, compressed], ["variables", "references", "compressed"],
                                  first_use=False)
    (data_dir / "Rdata.rdx").write_bytes(gzip.compress(rdx))


FAKE_LINES = {
    "emma": ["EMMA", "", "By Jane Austen", "", "", "", "CHAPTER I", "",
             "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
             "and _happy_ disposition, seemed to unite some of the best blessings", "",
             '"Poor Miss Taylor!--I wish she were here again."', None, "",
             '"I cannot agree with you, papa; you know I cannot."', ""],
    "persuasion": ["Persuasion", "", "", "by", "", "Jane Austen", "", "It cost her _very", "much_ to say it.",
                   "", "A sum of \u00a3300 a year."],
}
FAKE_EXPECTED = {
    "emma": "EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich, with a comfortable "
            "home and happy disposition, seemed to unite some of the best blessings\n\n"
            '"Poor Miss Taylor!--I wish she were here again."\n\n"I cannot agree with you, papa; you know I cannot."',
    "persuasion": "Persuasion\n\nby\n\nJane Austen\n\nIt cost her very much to say it.\n\nA sum of \u00a3300 a year.",
}


def test_extract_corpus_from_synthetic_r_database(tmp_path):
    vectors = {name: FAKE_LINES.get(name, [name.upper(), "", f"The {name} text,", "wrapped."])
               for name in extract_corpus.NOVELS}
    root = tmp_path / "deb"
    write_fake_rdb(root / extract_corpus.DATA_REL, vectors)
    out = tmp_path / "austen.txt.xz"
    assert extract_corpus.main([str(root), "--out", str(out)]) == 0
    assert out.read_bytes()[:6] == b"\xfd7zXZ\x00"
    novels = extract_corpus.load_novels(out)
    assert list(novels) == list(extract_corpus.NOVELS)
    for name, text in FAKE_EXPECTED.items():
        assert novels[name] == text
    assert novels["mansfieldpark"] == "MANSFIELDPARK\n\nThe mansfieldpark text, wrapped."
    # raw reader: the index and the character vectors, NA included
    objs = extract_corpus.read_lazyload_db(root / extract_corpus.DATA_REL / "Rdata.rdb",
                                           root / extract_corpus.DATA_REL / "Rdata.rdx")
    assert objs["emma"] == FAKE_LINES["emma"]


def test_validation_split_rule():
    text = "\n\n".join(f"Paragraph {i} " + "word " * (i % 7) for i in range(200))
    train, val = extract_corpus.split_novel(text)
    assert train + "\n\n" + val == text
    assert 0.025 < len(val) / len(text) <= 0.03
    assert val.startswith("Paragraph ")


def test_committed_corpus_and_split():
    novels = extract_corpus.load_novels()
    assert list(novels) == list(extract_corpus.NOVELS)
    assert 3.9e6 < sum(map(len, novels.values())) < 4.1e6
    assert "_" not in "".join(novels.values())
    _, val = extract_corpus.load_splits()
    for name in novels:
        assert 0.02 < len(val[name]) / len(novels[name]) < 0.035


def test_chat_pairs_format():
    text = ('"How do you do?" said Emma, "and your mother?"\n\n"Very well, thank you," replied Harriet.\n\n'
            "Narration follows here.\n\n"
            '"One," said Jane.\n\n"Two," said Jane.\n\n"Three," said Lydia.\n\n'
            '"An unfinished speech\n\n"that goes on," said Lydia.\n\n"Four."')
    pairs = chat_data.build_pairs({"x": text})
    assert pairs == [("How do you do? and your mother?", "Very well, thank you,"), ("Two,", "Three,")]
    assert chat_data.format_pair(*pairs[0]) == ("User: How do you do? and your mother?\n\n"
                                                "Assistant: Very well, thank you,\n\n")
    assert chat_data.format_pair(" a\n\n\nb ", "c\n\nd") == "User: a\nb\n\nAssistant: c\nd\n\n"
    docs = chat_data.build_chat_documents(extract_corpus.load_splits()[0])
    assert len(docs) > 2000
    for d in docs[:200]:
        assert d.startswith("User: ") and d.endswith("\n\n") and "\n\nAssistant: " in d
        turns = d[:-2].split("\n\n")
        assert all(t.startswith(("User: ", "Assistant: ")) for t in turns)


# ----------------------------------------------------------------------------------------------------------
# model layout
# ----------------------------------------------------------------------------------------------------------
def test_train_model_state_dict_is_blinkdl_layout():
    cfg = RWKV7Config(vocab_size=300, n_layer=3, n_embd=64, head_size=32)
    sd = RWKV7(cfg).state_dict()
    expected = blinkdl_shapes(cfg)
    assert set(sd) == set(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert not {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} & set(sd)
    assert config_from_state_dict(sd).to_dict() == {**cfg.to_dict()}


@pytest.mark.slow
def test_train_model_matches_rwkv_pip(tmp_path):
    """The official rwkv package (0.8.32) computes the same logits from the BlinkDL-named weights."""
    pytest.importorskip("rwkv")
    cfg = RWKV7Config(vocab_size=200, n_layer=2, n_embd=64, head_size=32)
    torch.manual_seed(0)
    model = RWKV7(cfg)
    with torch.no_grad():  # move every parameter off its (partly zero) init so each path is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() > 1 else 0.3))
    torch.save(model.state_dict(), tmp_path / "m.pth")
    tokens = torch.randint(0, 200, (1, 24))
    torch.save(tokens, tmp_path / "tokens.pt")
    with torch.no_grad():
        ours = model(tokens)[0]
    script = textwrap.dedent(f"""
        import os, torch
        os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "0"; os.environ["RWKV_CUDA_ON"] = "0"
        from rwkv.model import RWKV
        m = RWKV({str(tmp_path / 'm')!r}, strategy="cpu fp32")
        toks = torch.load({str(tmp_path / 'tokens.pt')!r})[0].tolist()
        out, _ = m.forward(toks, None, full_output=True)
        torch.save(out, {str(tmp_path / 'ref.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    ref = torch.load(tmp_path / "ref.pt")
    assert (ref - ours).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# training loop: smoke run and bitwise resume
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("micro")
    novels = extract_corpus.load_novels()
    small = {name: text[:40_000] for name, text in novels.items()}
    corpus = extract_corpus.write_corpus(small, tmp / "small.txt.xz")
    if SHIPPED_TOKENIZER.exists():
        tokenizer = SHIPPED_TOKENIZER
    else:
        from training.train_tokenizer import train_tokenizer, training_texts

        tokenizer = tmp / "tokenizer.json"
        train_tokenizer(training_texts(corpus), 4096).save(str(tokenizer))
    cfg = {
        "name": "rwkv7-micro",
        "seed": 7,
        "model": {"n_layer": 2, "n_embd": 64, "head_size": 32, "chunk_len": 32},
        "data": {"corpus": str(corpus), "tokenizer": str(tokenizer), "chat_fraction": 0.25},
        "train": {"batch_size": 4, "ctx_len": 64, "max_steps": 30, "lr": 3e-3, "lr_min": 1e-4, "warmup_steps": 5,
                  "eval_interval": 0, "ckpt_interval": 15, "log_interval": 0, "max_minutes": 0, "patience": 0,
                  "threads": 1, "progress_interval": 60},
        "export": {"dir": "", "card": False},
    }
    import yaml

    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp, path


def _history(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "history.json").read_text())["history"]]


def test_training_smoke_and_resume(micro_setup):
    from training import train

    tmp, cfg = micro_setup
    full, part = tmp / "full", tmp / "part"
    assert train.main(["--config", str(cfg), "--out", str(full), "--no-export"]) == 0
    losses = _history(full)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    assert train.main(["--config", str(cfg), "--out", str(part), "--no-export", "--steps", "15"]) == 0
    assert len(_history(part)) == 15
    assert train.main(["--config", str(cfg), "--out", str(part), "--no-export",
                       "--resume", str(part / "last.pt")]) == 0
    resumed = _history(part)
    assert len(resumed) == 30
    assert max(abs(a - b) for a, b in zip(resumed, losses)) <= 1e-6, (resumed, losses)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (full / "loss.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------
# the shipped model
# ----------------------------------------------------------------------------------------------------------
shipped = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists() or not (MODEL_DIR / "goose.json").exists(),
                             reason="models/rwkv7-austen has not been exported yet")


@shipped
def test_shipped_model_layout_and_metadata():
    from safetensors import safe_open
    from tokenizers import Tokenizer

    path = MODEL_DIR / "model.safetensors"
    assert path.stat().st_size <= 16 * 1024 * 1024
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    cfg = config_from_state_dict(sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == blinkdl_shapes(cfg)
    assert not {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} & set(sd)
    meta = json.loads((MODEL_DIR / "goose.json").read_text())
    assert meta["name"] == "rwkv7-austen" and meta["architecture"] == "rwkv7"
    assert meta["tokenizer"] == "tokenizer.json" and meta["eot_id"] == 0
    assert meta["chat"] == {"user": "User", "assistant": "Assistant", "system": "System", "separator": "\n\n",
                            "generation_prompt": "Assistant:"}
    assert meta["stop"] == ["\n\n", "\nUser:"]
    t = meta["training"]
    for key in ("params", "tokens_seen", "steps", "wall_minutes", "machine", "val_loss", "val_ppl",
                "eval_slice_loss", "eval_slice"):
        assert key in t, key
    assert t["params"] == sum(v.numel() for v in sd.values())
    assert abs(math.exp(t["val_loss"]) - t["val_ppl"]) < 0.01 * t["val_ppl"]
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert tok.get_vocab_size() == cfg.vocab_size
    assert (MODEL_DIR / "README.md").exists() and (MODEL_DIR / "loss.png").exists()


@shipped
def test_shipped_model_heldout_slice_loss():
    from training.eval import heldout_loss
    from training.model import load_safetensors_model

    meta = json.loads((MODEL_DIR / "goose.json").read_text())
    model = load_safetensors_model(MODEL_DIR / "model.safetensors")
    loss = heldout_loss(model, MODEL_DIR / "tokenizer.json")
    expected = meta["training"]["eval_slice_loss"]
    assert abs(loss - expected) <= 0.01 * expected, (loss, expected)
    assert loss < 6.0  # far below the uniform 8.3 nats: the weights are trained
