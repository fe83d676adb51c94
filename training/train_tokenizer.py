"""Train the byte-level BPE tokenizer of the embedded Austen model (HF ``tokenizers``, about 5 s on 2 cores).

    python -m training.train_tokenizer            # -> models/rwkv7-austen/tokenizer.json

Vocabulary 4096 with ``<|endoftext|>`` as id 0 (the document separator, RWKV's end-of-text id). It is trained on
the training split only (the novels minus their held-out last 3%) plus the chat documents mined from that split,
so "User", "Assistant" and the turn separator get tokens of their own. The pre-tokenizer is GPT-2's pattern
with runs of newlines kept whole, so "\\n\\n" (end of a paragraph or of a chat turn) is a single token.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from training.chat_data import build_chat_documents
from training.extract_corpus import DEFAULT_OUT as CORPUS_PATH
from training.extract_corpus import load_splits

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO / "models" / "rwkv7-austen" / "tokenizer.json"
EOT = "<|endoftext|>"
# GPT-2's split pattern with "\n+" runs isolated before the generic whitespace rules.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\n+|[^\S\n]+(?!\S)|[^\S\n]+"""


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def training_texts(corpus: Path = CORPUS_PATH, with_chat: bool = True) -> list[str]:
    train, _ = load_splits(corpus)
    texts = [p for text in train.values() for p in text.split("\n\n")]
    texts = [p + "\n\n" for p in texts]
    if with_chat:
        texts += build_chat_documents(train)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> Tokenizer:
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(EOT) == 0, "<|endoftext|> must be id 0"
    return tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train the Austen byte-level BPE tokenizer")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--corpus", default=str(CORPUS_PATH))
    ap.add_argument("--out", default=str(DEFAULT_TOKENIZER))
    args = ap.parse_args(argv)
    tok = train_tokenizer(training_texts(Path(args.corpus)), args.vocab_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    print(f"wrote {out}: vocab {tok.get_vocab_size()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
