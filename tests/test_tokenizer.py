"""Tokenizer tests: World ids equal to the rwkv package's reference, byte-exact round trips, streaming, HF, errors."""
from __future__ import annotations

import os
import random

import pytest

from bench.corpus import SAMPLES, mixed_corpus
from engine.text.tokenizer import (
    WORLD_EOT_TEXT, WORLD_VOCAB_PATH, HFTokenizer, StreamDecoder, WorldTokenizer, load_tokenizer,
)

def _has_pyrwkv() -> bool:
    try:
        import pyrwkv_tokenizer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def pure() -> WorldTokenizer:
    return WorldTokenizer(fast=False)


@pytest.fixture(scope="module")
def fast() -> WorldTokenizer:
    if not _has_pyrwkv():
        pytest.skip("pyrwkv_tokenizer is not installed")
    tok = WorldTokenizer(fast=True)
    assert tok.fast, "pyrwkv_tokenizer is importable but was not accepted as the fast path"
    return tok


@pytest.fixture(scope="module", params=["pure", "fast"])
def world(request) -> WorldTokenizer:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def reference():
    rwkv = pytest.importorskip("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def corpus() -> str:
    return mixed_corpus(300_000)


# ---------------------------------------------------------------------------------------------------- World: ids

def test_known_ids(world):
    assert world.encode("\n\n") == [261]
    assert world.encode("\n") == [11]
    assert world.encode("<think>") == [61, 35762, 63]
    assert world.encode("") == []
    assert world.vocab_size == 65536 and world.eot_id == 0 and world.name == "world"


def test_vocab_matches_reference(pure, reference):
    assert all(pure.id_to_token_bytes(i) == reference.idx2token[i] for i in range(1, 65530))
    assert [pure.id_to_token_bytes(i) for i in (0, *range(65530, 65536))] == [b""] * 7


def test_ids_match_reference_on_mixed_corpus(world, reference, corpus):
    assert world.encode(corpus) == reference.encode(corpus)


def test_ids_match_reference_line_by_line(world, reference, corpus):
    lines = corpus.split("\n")[:2000]
    assert [world.encode(s) for s in lines] == [reference.encode(s) for s in lines]


def test_encode_bytes_matches_reference_on_arbitrary_bytes(pure, reference):
    rng = random.Random(1)
    data = bytes(rng.choice(b"\x00\x80\xbf\xc3\xe4\xed\xf0\xff abc\n") for _ in range(20_000))
    assert pure.encode_bytes(data) == reference.encodeBytes(data)
    assert pure.decode_bytes(pure.encode_bytes(data)) == data


# ---------------------------------------------------------------------------------------------------- World: text

@pytest.mark.parametrize("text", SAMPLES + ["".join(SAMPLES)])
def test_round_trip(world, text):
    ids = world.encode(text)
    assert world.decode_bytes(ids) == text.encode("utf-8")
    assert world.decode(ids) == text


def test_round_trip_corpus(world, corpus):
    assert world.decode(world.encode(corpus)) == corpus


def test_lone_surrogates_become_replacement_char(world):
    assert world.decode(world.encode("a\ud800b")) == "a\ufffdb"
    assert world.decode(world.encode("x\ud83d\ude00y")) == "x😀y"  # a valid pair is joined


def test_invalid_utf8_decodes_with_replacement(pure):
    for raw in (b"\xff", b"a\xe4\xb8", b"\xed\xa0\x80z", b"\xf0\x9f\x98", b"\xc0\xaf", b"ok\x80ok"):
        ids = pure.encode_bytes(raw)
        assert pure.decode_bytes(ids) == raw
        assert pure.decode(ids) == raw.decode("utf-8", errors="replace")


def test_eot_handling(world):
    assert world.eot_text == WORLD_EOT_TEXT
    plain = world.encode(WORLD_EOT_TEXT)
    assert plain != [0] and 0 not in plain and world.decode(plain) == WORLD_EOT_TEXT
    assert world.encode(WORLD_EOT_TEXT, allow_special=True) == [0]
    assert world.encode(f"a{WORLD_EOT_TEXT}b{WORLD_EOT_TEXT}", allow_special=True) == [98, 0, 99, 0]
    assert world.decode_bytes([0]) == b"" and world.decode([98, 0, 99]) == "ab"
    assert 0 in world.special_ids


# ---------------------------------------------------------------------------------------------------- streaming

def _stream(decoder: StreamDecoder, ids) -> list[str]:
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


def test_stream_concat_equals_decode_for_valid_text(world, corpus):
    text = corpus[:50_000].replace("\ufffd", "")  # the corpus has a few literal U+FFFD; drop them for the check below
    ids = world.encode(text)
    pieces = _stream(world.stream_decoder(), ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # nothing emitted early as a broken partial character


def test_stream_holds_partial_characters(world):
    ids = world.encode("🤗")
    assert ids == [3319, 165, 152]  # b"\xf0\x9f" (a bytes-literal token), b"\xa4", b"\x97"
    dec = world.stream_decoder()
    assert [dec.feed(i) for i in ids] == ["", "", "🤗"]
    assert dec.pending_bytes == b"" and dec.flush() == ""


def test_stream_emits_never_valid_bytes_at_once(pure):
    dec = pure.stream_decoder()
    assert dec.feed(256) == "\ufffd"  # b"\xff" can never start a character
    assert dec.feed(0xE4 + 1) == ""  # b"\xe4": start of a 3-byte character, held
    assert dec.pending_bytes == b"\xe4"
    assert dec.feed(ord("a") + 1) == "\ufffda"
    assert dec.feed(0xED + 1) == "" and dec.feed(0xA0 + 1) == "\ufffd\ufffd"  # b"\xed\xa0" would be a surrogate
    assert dec.pending_bytes == b""
    assert dec.feed(0xF0 + 1) == "" and dec.flush() == "\ufffd"


def test_stream_concat_equals_decode_for_random_ids(pure):
    rng = random.Random(2)
    for _ in range(20):
        ids = [rng.randrange(pure.vocab_size) for _ in range(300)]
        ids += [rng.randrange(128, 257) for _ in range(300)]  # single high bytes: many partial/invalid sequences
        rng.shuffle(ids)
        assert "".join(_stream(pure.stream_decoder(), ids)) == pure.decode(ids)


# ---------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [65536, -1, 10**9])
def test_out_of_range_ids(pure, bad):
    with pytest.raises(ValueError, match=str(bad)):
        pure.decode([1, 2, bad])
    with pytest.raises(ValueError, match=str(bad)):
        pure.id_to_token_bytes(bad)
    with pytest.raises(ValueError, match=str(bad)):
        pure.stream_decoder().feed(bad)


def test_bad_specs(tmp_path):
    for spec in ("nonsense", str(tmp_path / "missing.txt")):
        with pytest.raises(ValueError, match="nonsense|missing.txt") as e:
            load_tokenizer(spec)
        assert "tokenizer.json" in str(e.value)
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        load_tokenizer(str(tmp_path / "notes.txt"))


def _small_vocab_lines() -> list[str]:
    """A valid World-format vocab: the 256 single bytes, then a few longer tokens."""
    lines = [f"{b + 1} {bytes([b]).decode('latin-1')!r} 1" if b < 0x80 else f"{b + 1} {bytes([b])!r} 1"
             for b in range(256)]
    return lines + ["257 'ab' 2", "258 'abc' 3", "259 '你好' 6", "260 b'\\xe4\\xbd' 2"]


def test_custom_vocab_file(tmp_path):
    path = tmp_path / "rwkv_vocab_small.txt"
    path.write_text("\r\n".join(_small_vocab_lines()) + "\r\n", encoding="utf-8", newline="")
    for tok in (load_tokenizer(str(path)), WorldTokenizer(path, fast=False)):
        assert tok.vocab_size == 320 and tok.name.startswith("world:")
        assert tok.encode("abcab你好你") == [258, 257, 259, 260, 0xA0 + 1]
        assert tok.decode(tok.encode("xabc你好")) == "xabc你好"


@pytest.mark.parametrize("line, reason", [
    ("257 'ab' 3", "3"),                     # wrong byte length
    ("257 'ab 2", "corrupt"),                # unterminated literal
    ("257 __import__('os').getpid() 2", "corrupt"),  # not a literal: must not be evaluated
    ("x 'ab' 2", "corrupt"),                 # bad id
    ("0 'ab' 2", "reserved"),                # id 0 is end-of-text
    ("257 12 2", "int"),                     # not str/bytes
    ("257", "corrupt"),                      # missing fields
])
def test_corrupt_vocab_line_names_file_and_line(tmp_path, line, reason):
    lines = _small_vocab_lines()
    lines.insert(2, line)
    path = tmp_path / "rwkv_vocab_bad.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"rwkv_vocab_bad\.txt:3:.*{reason}"):
        load_tokenizer(str(path))


def test_vocab_missing_single_bytes(tmp_path):
    path = tmp_path / "rwkv_vocab_tiny.txt"
    path.write_text("1 'a' 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="single-byte"):
        WorldTokenizer(path)


def test_load_world_specs(tmp_path):
    assert load_tokenizer("world").name == "world"
    assert load_tokenizer(str(WORLD_VOCAB_PATH)).encode("\n\n") == [261]
    assert isinstance(load_tokenizer(str(WORLD_VOCAB_PATH.parent)), WorldTokenizer)


# ---------------------------------------------------------------------------------------------------- Hugging Face

@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    """A tiny byte-level BPE trained here, with "<|endoftext|>" as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLES * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf(hf_path) -> HFTokenizer:
    return HFTokenizer(hf_path)


def test_hf_round_trip(hf, corpus):
    for text in SAMPLES + [corpus[:20_000]]:
        ids = hf.encode(text)
        assert hf.decode_bytes(ids) == text.encode("utf-8")
        assert hf.decode(ids) == text


def test_hf_eot(hf):
    assert hf.eot_id == 0 and hf.eot_text == "<|endoftext|>" and 0 in hf.special_ids
    assert 0 not in hf.encode("a <|endoftext|> b")  # specials are text by default
    assert hf.encode("<|endoftext|>", allow_special=True) == [0]
    assert hf.decode(hf.encode("a <|endoftext|> b")) == "a <|endoftext|> b"
    assert hf.decode_bytes([0]) == b""


def test_hf_byte_level_tokens_are_raw_bytes(hf):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(hf.path))
    assert hf.id_to_token_bytes(raw.token_to_id("ä")) == b"\xe4"  # "ä" is the byte-level stand-in for 0xE4
    assert hf.id_to_token_bytes(raw.token_to_id("Ġ")) == b" "


def test_hf_stream_decoder_on_multibyte(hf):
    text = "你好世界 😀👨‍👩‍👧‍👦 ещё 🇯🇵"
    ids = hf.encode(text)
    assert any(len(hf.id_to_token_bytes(i)) == 1 and hf.id_to_token_bytes(i)[0] >= 0x80 for i in ids)
    pieces = _stream(hf.stream_decoder(), ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_hf_load_and_errors(hf_path, tmp_path):
    assert isinstance(load_tokenizer(str(hf_path)), HFTokenizer)
    assert load_tokenizer(str(hf_path.parent)).eot_id == 0
    with pytest.raises(ValueError, match="no end-of-text token"):
        HFTokenizer(hf_path, eot_token="<|nope|>")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    tok = HFTokenizer(hf_path)
    with pytest.raises(ValueError, match=str(tok.vocab_size)):
        tok.decode([tok.vocab_size])
