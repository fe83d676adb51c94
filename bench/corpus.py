"""Deterministic multilingual text for tokenizer tests and benchmarks (no data files needed)."""
from __future__ import annotations

import random

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m. on 2024-05-17, and it is -3.5°C!",
    "人工智能正在改变世界，我们需要认真思考它的影响。北京的天气今天很好。",
    "日本語のテキストも含めます。カタカナとひらがな、そして漢字が混ざっています。東京タワー",
    "مرحبا بالعالم! هذه جملة باللغة العربية للاختبار.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "한국어 문장도 테스트합니다. 안녕하세요!",
    "नमस्ते दुनिया, यह हिंदी में एक वाक्य है।",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. שלום עולם. สวัสดีชาวโลก",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ❤️‍🔥 🧑🏿‍💻",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "    \t\t   \n\n\n  \r\n  " + " " * 70 + "-" * 130,
    "<think>\n</think>\n\nUser: hi\n\nAssistant: Hello!",
    "Ünïcödé àccents: naïve café, façade, Ångström, ß, Œuvre \x00\x01\x7f",
    "\n\n",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    """n random code points, weighted across ASCII, 2-, 3- and 4-byte UTF-8 (surrogates excluded)."""
    out = []
    for _ in range(n):
        r = rng.random()
        lo, hi = (0x20, 0x7E) if r < 0.3 else (0xA0, 0x7FF) if r < 0.5 else (0x800, 0xFFFD) if r < 0.8 \
            else (0x10000, 0x3FFFF)
        cp = rng.randint(lo, hi)
        out.append(chr(0xFFFD if 0xD800 <= cp <= 0xDFFF else cp))
    return "".join(out)


def mixed_corpus(nbytes: int, seed: int = 0) -> str:
    """Deterministic multilingual text of about nbytes UTF-8 bytes: samples, shuffled words, random code points."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < nbytes:
        r = rng.random()
        if r < 0.15:
            piece = _random_unicode(rng, rng.randint(1, 40))
        elif r < 0.5:
            words = rng.choice(SAMPLES).split(" ")
            rng.shuffle(words)
            piece = " ".join(words)
        else:
            piece = rng.choice(SAMPLES)
        piece += rng.choice([" ", "\n", "\n\n", "", "  "])
        parts.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(parts)
