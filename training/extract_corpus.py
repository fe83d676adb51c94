"""Extract Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` package (standard library only).

The package stores the novels as an R lazy-load database: ``data/Rdata.rdb`` holds the serialized objects,
``data/Rdata.rdx`` the index (a gzip-compressed RDS file, or a length-prefixed zlib chunk) with a named list of
(offset, length) pairs into the ``.rdb``. Each ``.rdb`` chunk is a 4-byte big-endian uncompressed length followed
by a zlib stream (R's ``compressed = 2/3`` databases add a type byte: ``'Z'`` xz, ``'2'`` bzip2, ``'0'`` stored).
Each payload is an R XDR serialization of a character vector, one element per line of the book.

Usage (R is not needed)::

    apt-get update && apt-get download r-cran-janeaustenr
    dpkg-deb -x r-cran-janeaustenr_*_all.deb /tmp/janeaustenr
    python -m training.extract_corpus /tmp/janeaustenr      # writes training/data/austen.txt.xz

The cleaned text is committed (``training/data/austen.txt.xz``) so retraining needs no apt step. File format:
the novels in ``NOVELS`` order, each one preceded by a header line ``<<<name>>>``; paragraphs are separated by
one blank line and contain no line breaks. ``load_novels()`` reads it back; ``split_novel()`` is the
deterministic train/validation rule (the last 3% of each novel is held out).
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import os
import re
import struct
import sys
import zlib
from pathlib import Path

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DATA_REL = Path("usr/lib/R/site-library/janeaustenr/data")
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "austen.txt.xz"
VAL_FRACTION = 0.03
HEADER_RE = re.compile(r"^<<<([a-z]+)>>>\n", re.M)

# ----------------------------------------------------------------------------------------------------------
# R XDR unserialization (the subset used by data lazy-load databases)
# ----------------------------------------------------------------------------------------------------------
NILSXP, SYMSXP, LISTSXP, LGLSXP, INTSXP, REALSXP, CHARSXP, STRSXP, VECSXP = 0, 1, 2, 10, 13, 14, 9, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
MISSINGARG_SXP, BASENAMESPACE_SXP, UNBOUNDVALUE_SXP = 251, 247, 252
NA_INT = -2147483648


class RList(list):
    """An R list or atomic vector with its attributes (``attrs``: dict name -> value)."""

    def __init__(self, items=(), attrs=None):
        super().__init__(items)
        self.attrs = attrs or {}

    @property
    def names(self):
        return self.attrs.get("names")


class _Reader:
    def __init__(self, data: bytes):
        self.d = data
        self.p = 0
        self.refs: list = []

    def raw(self, n: int) -> bytes:
        if self.p + n > len(self.d):
            raise ValueError("truncated R serialization")
        out = self.d[self.p:self.p + n]
        self.p += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.raw(4))[0]

    def header(self) -> None:
        fmt = self.raw(2)
        if fmt != b"X\n":
            raise ValueError(f"not an XDR R serialization (format {fmt!r})")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            self.raw(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported serialization version {version}")

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == NILVALUE_SXP or t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, MISSINGARG_SXP,
                                       BASENAMESPACE_SXP, UNBOUNDVALUE_SXP):
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            latin1 = bool((flags >> 12) & (1 << 2))  # LATIN1_MASK; UTF8/ASCII/native are read as UTF-8
            return self.raw(n).decode("latin-1" if latin1 else "utf-8")
        if t == LISTSXP:  # pairlist: returned as a dict (tag -> value) if tagged, else a list
            out: list[tuple] = []
            while True:
                if has_attr:
                    self.item()  # pairlist attributes are read and ignored
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                nxt = self.int()
                nt = nxt & 0xFF
                if nt == NILVALUE_SXP:
                    break
                if nt != LISTSXP:
                    raise ValueError(f"unsupported pairlist tail type {nt}")
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
            if all(tag is not None for tag, _ in out):
                return dict(out)
            return [v for _, v in out]
        if t in (STRSXP, VECSXP, LGLSXP, INTSXP, REALSXP):
            n = self.int()
            if n == -1:  # long vector
                n = (self.int() << 32) + self.int()
            if t in (STRSXP, VECSXP):
                vals = [self.item() for _ in range(n)]
            elif t in (LGLSXP, INTSXP):
                vals = [None if x == NA_INT else x for x in struct.unpack(f">{n}i", self.raw(4 * n))]
            else:
                vals = list(struct.unpack(f">{n}d", self.raw(8 * n)))
            attrs = self.item() if has_attr else None
            return RList(vals, attrs if isinstance(attrs, dict) else None)
        raise ValueError(f"unsupported R SEXP type {t} at byte {self.p - 4}")


def unserialize(data: bytes):
    """Parse one XDR R serialization (``serialize(x, NULL)`` / RDS payload)."""
    r = _Reader(data)
    r.header()
    return r.item()


def _decompress_chunk(blob: bytes, compressed: int | None = 1) -> bytes:
    """A lazy-load chunk: 4-byte big-endian length, optional type byte, compressed stream."""
    (n,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    if compressed in (2, 3) or body[:1] in (b"Z", b"2", b"0"):  # never a zlib header byte
        kind, body = body[:1], body[1:]
        if kind == b"Z":
            out = lzma.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"0":
            out = body
        else:  # compressed == 2/3 but a zlib stream after all
            out = zlib.decompress(kind + body)
    else:
        out = zlib.decompress(body)
    if len(out) != n:
        raise ValueError(f"chunk length mismatch: header says {n}, got {len(out)}")
    return out


def read_rdx(path: Path) -> dict:
    blob = Path(path).read_bytes()
    if blob[:2] == b"\x1f\x8b":  # saveRDS(compress=TRUE): a gzip file
        payload = gzip.decompress(blob)
    elif blob[:2] == b"X\n":
        payload = blob
    else:
        payload = _decompress_chunk(blob)
    index = unserialize(payload)
    names = index.names
    return dict(zip(names, index))


def read_lazyload_db(rdb: Path, rdx: Path) -> dict[str, list]:
    """Return every variable of an R lazy-load database as a Python value (character vectors -> list[str])."""
    index = read_rdx(rdx)
    comp = index.get("compressed")
    comp = int(comp[0]) if comp else 1
    data = Path(rdb).read_bytes()
    variables = index["variables"]
    out = {}
    for name, (offset, length) in zip(variables.names, variables):
        out[name] = unserialize(_decompress_chunk(data[offset:offset + length], comp))
    return out


# ----------------------------------------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------------------------------------
_ITALIC_RE = re.compile(r"_([^_]*)_")


def clean_lines(lines: list) -> str:
    """Unwrap hard-wrapped lines into paragraphs (blank line = paragraph break), drop ``_italic_`` marks."""
    paras: list[str] = []
    cur: list[str] = []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    out = []
    for p in paras:
        p = _ITALIC_RE.sub(r"\1", p).replace("_", "")
        p = re.sub(r"[ \t]+", " ", p).strip()
        if p:
            out.append(p)
    return "\n\n".join(out)


def extract(root: Path) -> dict[str, str]:
    """``root`` is an unpacked r-cran-janeaustenr .deb (or the ``data`` directory itself)."""
    root = Path(root)
    data_dir = root if (root / "Rdata.rdb").exists() else root / DATA_REL
    objs = read_lazyload_db(data_dir / "Rdata.rdb", data_dir / "Rdata.rdx")
    missing = [n for n in NOVELS if n not in objs]
    if missing:
        raise ValueError(f"novels missing from the database: {missing}")
    return {name: clean_lines(objs[name]) for name in NOVELS}


def format_corpus(novels: dict[str, str]) -> str:
    return "".join(f"<<<{name}>>>\n{text}\n" for name, text in novels.items())


def parse_corpus(text: str) -> dict[str, str]:
    parts = HEADER_RE.split(text)
    # parts = ['', name1, body1, name2, body2, ...]
    return {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts), 2)}


def write_corpus(novels: dict[str, str], out: Path = DEFAULT_OUT) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = format_corpus(novels).encode("utf-8")
    out.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME) if out.suffix == ".xz" else raw)
    return out


def load_novels(path: Path = DEFAULT_OUT) -> dict[str, str]:
    raw = Path(path).read_bytes()
    if raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    return parse_corpus(raw.decode("utf-8"))


def split_novel(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """Deterministic split: the validation part is the last ``val_fraction`` of the novel's characters,
    moved forward to the next paragraph boundary (so no paragraph is cut)."""
    cut = int(len(text) * (1.0 - val_fraction))
    j = text.find("\n\n", cut)
    if j < 0:
        j = cut
    return text[:j], text[j:].lstrip("\n")


def load_splits(path: Path = DEFAULT_OUT, val_fraction: float = VAL_FRACTION) -> tuple[dict, dict]:
    """Return ({name: train_text}, {name: val_text}) for the six novels."""
    train, val = {}, {}
    for name, text in load_novels(path).items():
        train[name], val[name] = split_novel(text, val_fraction)
    return train, val


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="unpacked r-cran-janeaustenr .deb directory (or its data/ directory)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    novels = extract(Path(args.root))
    out = write_corpus(novels, Path(args.out))
    total = sum(len(t) for t in novels.values())
    words = sum(len(t.split()) for t in novels.values())
    print(f"wrote {out} ({os.path.getsize(out)} bytes; {total} chars, {words} words)", file=sys.stderr)
    for name, text in novels.items():
        print(f"  {name}: {len(text)} chars, {text.count(chr(10) * 2) + 1} paragraphs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
