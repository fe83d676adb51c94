"""Chat pairs mined from the novels' dialogue, in the engine's chat format.

A *speech paragraph* starts with a double quote and closes every quote it opens. Austen (like every novelist of
her time) starts a new paragraph when the speaker changes, so two consecutive speech paragraphs are a line and its
reply by different speakers. We additionally drop a pair when both paragraphs name the same speaker
("said Emma" ... "said Emma"), and we skip paragraphs that continue a multi-paragraph speech (the previous
paragraph left a quote open). Only the quoted words are kept, narration between them is dropped::

    "My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"
    -> My dear Mr. Bennet, have you heard that Netherfield Park is let at last?

A run of consecutive speech paragraphs becomes one conversation (User, Assistant, User, ...), emitted as
overlapping pairs and, for runs of 4+, also as multi-turn documents. Format, exactly::

    User: {line}\\n\\nAssistant: {reply}\\n\\n

Inside a message, any "\\n\\n" is collapsed into "\\n" and the message is stripped, so "\\n\\n" only ever ends a turn.
"""
from __future__ import annotations

import random
import re

SPEECH_VERBS = (
    "said|cried|replied|answered|returned|continued|added|exclaimed|asked|observed|repeated|rejoined|"
    "resumed|began|whispered|interrupted|called|says|inquired|enquired|retorted|persisted|pursued"
)
_NAME = r"((?:Mr\.|Mrs\.|Miss|Lady|Sir|Colonel|Captain|Admiral|Dr\.|Lord) [A-Z][a-z]+|[A-Z][a-z]+)"
_SPEAKER_RES = (
    re.compile(rf"\b(?:{SPEECH_VERBS}) {_NAME}"),      # said Elizabeth / cried Mrs. Bennet
    re.compile(rf"\b{_NAME} (?:{SPEECH_VERBS})\b"),    # Elizabeth said
)
_QUOTE_RE = re.compile(r'"([^"]*)"')
_PRONOUNS = {"He", "She", "It", "They", "I", "We", "You", "His", "Her", "The", "This", "That", "And", "But"}

MAX_MESSAGE_CHARS = 400


def clean_message(text: str) -> str:
    """Collapse blank lines inside a message and strip it."""
    text = text.replace("\r\n", "\n")
    text = re.sub(r"\n{2,}", "\n", text)
    return text.strip()


def format_pair(line: str, reply: str) -> str:
    return f"User: {clean_message(line)}\n\nAssistant: {clean_message(reply)}\n\n"


def format_conversation(turns: list[str]) -> str:
    roles = ("User", "Assistant")
    return "".join(f"{roles[i % 2]}: {clean_message(t)}\n\n" for i, t in enumerate(turns))


def speaker(paragraph: str) -> str | None:
    """The attributed speaker of a speech paragraph, from the narration outside the quotes (or None)."""
    narration = _QUOTE_RE.sub(" | ", paragraph)
    for rx in _SPEAKER_RES:
        m = rx.search(narration)
        if m and m.group(1) not in _PRONOUNS:
            return m.group(1)
    return None


def speech(paragraph: str) -> str | None:
    """The quoted words of a speech paragraph joined by spaces, or None if it is not a complete speech."""
    p = paragraph.strip()
    if not p.startswith('"') or p.count('"') % 2:
        return None
    parts = [q.strip() for q in _QUOTE_RE.findall(p)]
    text = " ".join(q for q in parts if q)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) < 2 or len(text) > MAX_MESSAGE_CHARS:
        return None
    return text


def dialogue_runs(text: str) -> list[list[str]]:
    """Runs of consecutive speech paragraphs by alternating speakers in one novel's cleaned text."""
    runs: list[list[str]] = []
    cur: list[str] = []
    last_speaker: str | None = None

    def flush():
        if len(cur) >= 2:
            runs.append(list(cur))
        cur.clear()

    prev_open = False
    for para in text.split("\n\n"):
        continuation = prev_open
        # Multi-paragraph speeches open a quote in every paragraph and close it only in the last one.
        prev_open = para.lstrip().startswith('"') and para.count('"') % 2 == 1
        s = None if continuation else speech(para)
        if s is None:
            flush()
            last_speaker = None
            continue
        who = speaker(para)
        if cur and who is not None and who == last_speaker:
            flush()  # the same speaker twice in a row is not a reply
        cur.append(s)
        last_speaker = who
    flush()
    return runs


def build_pairs(novels: dict[str, str]) -> list[tuple[str, str]]:
    """Every (line, reply) pair of consecutive dialogue, in novel order."""
    pairs = []
    for text in novels.values():
        for run in dialogue_runs(text):
            pairs.extend(zip(run[:-1], run[1:]))
    return pairs


def build_chat_documents(novels: dict[str, str], seed: int = 0, max_turns: int = 6) -> list[str]:
    """Chat documents for training: one per consecutive pair, plus multi-turn windows of long runs.

    Deterministic for a given seed; documents are shuffled so the stream mixes novels."""
    docs = []
    for text in novels.values():
        for run in dialogue_runs(text):
            docs.extend(format_pair(a, b) for a, b in zip(run[:-1], run[1:]))
            for start in range(0, len(run) - 3, max_turns):
                window = run[start:start + max_turns]
                if len(window) % 2:
                    window = window[:-1]
                if len(window) >= 4:
                    docs.append(format_conversation(window))
    random.Random(seed).shuffle(docs)
    return docs


if __name__ == "__main__":  # quick look: python -m training.chat_data
    from training.extract_corpus import load_splits

    train, _ = load_splits()
    pairs = build_pairs(train)
    docs = build_chat_documents(train)
    print(f"{len(pairs)} pairs, {len(docs)} documents, {sum(map(len, docs))} chars")
    for d in docs[:5]:
        print(repr(d))
