"""`goose convert SRC DST`: move an RWKV-7 model between .pth, .safetensors, a Hugging Face (fla-hub) directory and GGUF.

    goose convert SRC DST [--to pth|safetensors|hf|gguf|tokenizer] [--dtype fp32|fp16|bf16|q8_0|q4_0|i8|i4]
                          [--tokenizer world|none|PATH] [--force] [--quiet]

The output format comes from DST when --to is omitted: .pth/.pt, .safetensors, .gguf, a .json/.txt tokenizer file,
or a directory (no suffix) for the Hugging Face layout. Tensors are read lazily (memory-mapped) and written one at a
time, so a conversion needs about one tensor of extra memory (a .pth output is the exception: torch.save takes the
whole dict, about 1x the model). Outputs are written to a temporary name and renamed at the end; an existing DST is
refused unless --force. --dtype i8|i4 writes a quantized .safetensors file, the big matrices stored as the
`cpu ...i8` / `cpu ...i4` strategies hold them (layout: engine/formats/quantized.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.errors import ModelLoadError
from engine.formats import quantized
from engine.formats.hf import (
    TokenizerData,
    fla_name,
    tokenizer_data_from_spec,
    tokenizer_data_in_dir,
    world_tokenizer_data,
    write_hf_extras,
    write_tokenizer_files,
)
from engine.formats.checkpoint import (
    ST_DTYPES,
    check_variant,
    infer_config,
    open_checkpoint,
    to_blinkdl_names,
    validate,
)

FORMATS = ("pth", "safetensors", "hf", "gguf", "tokenizer")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GGUF_QUANT = ("q8_0", "q4_0")      # GGUF-only file types (matrices whose rows are not a multiple of 32 stay F16)
QUANT_DTYPES = tuple(quantized.KINDS)                  # i8, i4: quantized safetensors
ALL_DTYPES = (*DTYPES, *GGUF_QUANT, *QUANT_DTYPES)
PROGRESS_MIN_BYTES = 64 << 20          # show a progress bar for outputs larger than this
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# ----------------------------------------------------------------------------------------------- sources
class Source:
    """A checkpoint opened lazily: BlinkDL names in canonical shapes, meta tensors for planning, get() one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = open_checkpoint(self.path)
        self.kind, self._gguf, self._raw_get = raw.kind, raw.gguf, raw.get
        self.quantized = raw.quantized               # "i8" | "i4" for a quantized safetensors: get() dequantizes
        check_variant(raw.meta, self.path)
        if "emb.weight" in raw.meta:
            meta, self._index = dict(raw.meta), {k: k for k in raw.meta}
        else:                                        # fla-hub names: map each key on its own (shapes only)
            meta, self._index = {}, {}
            for key, t in raw.meta.items():
                for blink, mt in to_blinkdl_names({key: t}, self.path).items():
                    meta[blink], self._index[blink] = mt, key
        self.config = infer_config(meta, self.path)
        canon = validate(meta, self.config, self.path)
        self.meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in canon.items()}
        self.names = list(canon)

    def get(self, name: str) -> torch.Tensor:
        """One tensor in BlinkDL naming and canonical shape, in its stored dtype."""
        if self._gguf is not None:
            t = self._gguf.get(name)
        else:
            raw_key = self._index[name]
            t = self._raw_get(raw_key)
            if raw_key != name:
                t = to_blinkdl_names({raw_key: t}, self.path)[name]
        if not isinstance(t, torch.Tensor):              # a quantized file's matrix: back to float
            t = t.dequantize(torch.float32)
        shape = self.meta[name].shape
        return t.reshape(shape) if t.shape != shape else t

    def tokenizer(self) -> TokenizerData | None:
        """The tokenizer that travels with this source: embedded in a GGUF, the files of an HF directory, or an
        rwkv_vocab_v20230424.txt / tokenizer.json beside a .pth or .safetensors file."""
        if self._gguf is not None:
            return self._gguf.tokenizer()
        return tokenizer_data_in_dir(self.path if self.kind == "hf" else self.path.parent)


# ----------------------------------------------------------------------------------------------- writers
def write_safetensors(path: Path, entries: list[tuple[str, tuple, torch.dtype]], produce: Callable[[str], torch.Tensor],
                      progress: Callable[[int], None] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Stream a safetensors file: header from the planned shapes, then each tensor's bytes as it is produced
    (in the order of entries)."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        n = _numel(shape) * _itemsize(dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            t = produce(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ModelLoadError(f"tensor {name}: produced shape {list(t.shape)}, planned {list(shape)}")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            if progress is not None:
                progress(t.numel() * t.element_size())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------- conversion
def output_format(dst: Path, to: str | None) -> str:
    if to:
        return to
    suffix = dst.suffix.lower()
    by_suffix = {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".gguf": "gguf",
                 ".json": "tokenizer", ".txt": "tokenizer"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if dst.is_dir() or suffix == "":
        return "hf"
    raise ModelLoadError(f"{dst}: cannot tell the output format from the suffix {suffix!r}; pass --to "
                         f"{'|'.join(FORMATS)}")


def _default_tokenizer(source: Source, note: Callable[[str], None]) -> TokenizerData | None:
    tok = source.tokenizer()
    if tok is not None:
        note(f"tokenizer: {tok.kind} from {tok.source}")
        return tok
    if 65530 <= source.config.vocab_size <= 65536:
        note(f"tokenizer: world (default for a {source.config.vocab_size}-row vocabulary; --tokenizer to change)")
        return world_tokenizer_data()
    note("tokenizer: none found (pass --tokenizer world|PATH to embed one)")
    return None


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, dtype: str | None = None,
            tokenizer: str | None = None, force: bool = False, progress: bool = True,
            note: Callable[[str], None] | None = None) -> dict:
    """Convert src to dst; returns a summary dict (format, tensors, bytes, seconds). Raises ModelLoadError."""
    note = note or (lambda text: print(text, file=sys.stderr))
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    fmt = output_format(dst, to)
    if fmt not in FORMATS:
        raise ModelLoadError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in ALL_DTYPES:
        raise ModelLoadError(f"unknown --dtype {dtype!r}; choose one of {', '.join(ALL_DTYPES)}")
    if dtype in GGUF_QUANT and fmt != "gguf":
        raise ModelLoadError(f"--dtype {dtype} is a GGUF file type; other formats take fp32, fp16 or bf16 "
                             "(and .safetensors also i8 or i4)")
    if dtype in QUANT_DTYPES and fmt != "safetensors":
        raise ModelLoadError(f"--dtype {dtype} writes a quantized .safetensors file, not {fmt}; "
                             f"for GGUF use --dtype q8_0 or q4_0")
    if dtype is not None and fmt == "tokenizer":
        raise ModelLoadError("--dtype does not apply to --to tokenizer")
    if not src.exists():
        raise ModelLoadError(f"{src}: no such file or directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ModelLoadError(f"{dst}: is the source itself; choose another output")
    if dst.exists() and not force:
        raise ModelLoadError(f"{dst}: already exists; pass --force to overwrite it")
    if fmt == "tokenizer":
        return _export_tokenizer(src, dst, tokenizer, force, t0)

    source = Source(src)
    cfg = source.config
    if dtype in QUANT_DTYPES and source.quantized:
        raise ModelLoadError(f"{src}: is already quantized ({source.quantized}); quantize the float checkpoint "
                             f"instead of quantizing twice")
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    bar = None
    try:
        if fmt == "gguf":
            from engine.formats.gguf import require_gguf
            from engine.formats.gguf_write import (
                bpe_pretokenizer_note,
                tensor_nbytes,
                tensor_plan,
                tensor_qtype,
                write_gguf,
            )
            Q = require_gguf().GGMLQuantizationType
            if dtype is None:
                ftype = {torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(source.meta["emb.weight"].dtype, Q.F32)
            else:
                ftype = {"fp32": Q.F32, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]
            tok = tokenizer_data_from_spec(tokenizer) if tokenizer is not None else _default_tokenizer(source, note)
            if (warning := bpe_pretokenizer_note(tok)) is not None:
                note(warning)
            total = sum(tensor_nbytes(s, tensor_qtype(n, s, ftype)) for n, s, _ in tensor_plan(cfg))
            bar = _bar(total, dst, progress)
            tensors = write_gguf(tmp, cfg, source.get, ftype=ftype, tokenizer=tok, name=dst.stem,
                                 progress=bar.update if bar else None)
            detail = f"GGUF {ftype.name}, {len(tensors)} tensors"
        else:
            want = DTYPES.get(dtype) if dtype in DTYPES else None
            out_dtype = lambda name: want or source.meta[name].dtype
            total = sum(_numel(source.meta[n].shape) * _itemsize(out_dtype(n)) for n in source.names)
            bar = _bar(total, dst, progress)
            update = bar.update if bar else None
            if fmt == "pth":
                sd = {n: source.get(n).to(out_dtype(n)).contiguous() for n in source.names}
                torch.save(sd, tmp)
                detail = f"{len(sd)} tensors"
            elif fmt == "safetensors" and dtype in QUANT_DTYPES:
                detail = quantized.write_file(tmp, source.names, source.meta, source.get, dtype, bar)
            elif fmt == "safetensors":
                write_safetensors(tmp, [(n, tuple(source.meta[n].shape), out_dtype(n)) for n in source.names],
                                  source.get, update)
                detail = f"{len(source.names)} tensors"
            else:
                detail = _write_hf(tmp, source, out_dtype, tokenizer, update, note)
        if bar:
            bar.close()
        _replace(tmp, dst, force)
    except BaseException:
        if bar:
            bar.close()
        _remove(tmp)
        raise
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) if dst.is_dir() else dst.stat().st_size
    note(f"wrote {dst} ({fmt}: {detail}, {size / 2**20:.1f} MiB) in {seconds:.1f} s")
    return {"format": fmt, "bytes": size, "seconds": seconds, "detail": detail}


def _write_hf(tmp: Path, source: Source, out_dtype, tokenizer: str | None, update, note) -> str:
    tmp.mkdir(parents=True)
    names: dict[str, str] = {}
    entries = []
    for n in source.names:
        mapped = fla_name(n, source.meta[n])
        if mapped is None:
            continue
        hf, mt = mapped
        names[hf] = n
        entries.append((hf, tuple(mt.shape), out_dtype(n)))
    write_safetensors(tmp / "model.safetensors", entries,
                      lambda hf: fla_name(names[hf], source.get(names[hf]))[1], update)
    tok = tokenizer_data_from_spec(tokenizer) if tokenizer is not None else _default_tokenizer(source, note)
    write_hf_extras(tmp, source.config, out_dtype("emb.weight"), tok)
    return f"fla-hub layout, {len(entries)} tensors, tokenizer {tok.kind if tok else 'none'}"


def _export_tokenizer(src: Path, dst: Path, spec: str | None, force: bool, t0: float) -> dict:
    """Write the tokenizer of src (a GGUF's embedded one, an HF directory's, or --tokenizer) as a file or directory."""
    if spec is not None:
        tok = tokenizer_data_from_spec(spec)
    elif src.suffix == ".gguf":
        from engine.formats.gguf import GGUFCheckpoint
        tok = GGUFCheckpoint(src).tokenizer()
    else:
        tok = tokenizer_data_in_dir(src if src.is_dir() else src.parent)
    if tok is None:
        raise ModelLoadError(f"{src}: holds no tokenizer that can be exported")
    want = {".json": "bpe", ".txt": "world"}.get(dst.suffix.lower())
    if want is not None and want != tok.kind:
        raise ModelLoadError(f"{dst}: a {tok.kind} tokenizer is written as "
                             f"{'tokenizer.json' if tok.kind == 'bpe' else 'an rwkv_vocab_*.txt file'}")
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        if want is None:
            tmp.mkdir(parents=True)
            write_tokenizer_files(tok, tmp)
        else:
            from engine.formats.hf import render_world_vocab
            tmp.write_text(render_world_vocab(tok.world_vocab) if tok.kind == "world" else tok.hf_json,
                           encoding="utf-8")
        _replace(tmp, dst, force)
    except BaseException:
        _remove(tmp)
        raise
    return {"format": "tokenizer", "bytes": 0, "seconds": time.perf_counter() - t0, "detail": tok.kind}


def _bar(total: int, dst: Path, enabled: bool):
    if not enabled or total < PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {dst.name}",
                file=sys.stderr, leave=False)


def _replace(tmp: Path, dst: Path, force: bool) -> None:
    if dst.exists():
        if not force:
            raise ModelLoadError(f"{dst}: already exists; pass --force to overwrite it")
        if dst.is_dir():
            if not any((dst / n).exists() for n in ("config.json", "model.safetensors")) \
                    and not any(dst.glob("*.safetensors")) and not any(dst.glob("rwkv_vocab_*.txt")) \
                    and not (dst / "tokenizer.json").exists():
                raise ModelLoadError(f"{dst}: is a directory that does not look like a model or tokenizer; "
                                     f"refusing to replace it even with --force")
            shutil.rmtree(dst)
        elif tmp.is_dir():
            dst.unlink()
    os.replace(tmp, dst)


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goose convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("src", help="a .pth, .safetensors, .gguf, or Hugging Face directory")
    ap.add_argument("dst", help="the output file or directory")
    ap.add_argument("--to", choices=FORMATS, help="output format (default: from DST's suffix; none = hf directory)")
    ap.add_argument("--dtype", choices=ALL_DTYPES,
                    help="weights dtype (default: as stored); GGUF: the file type of the matrices (also q8_0, "
                         "q4_0); .safetensors: also i8 or i4, the big matrices quantized as the cpu ...i8 / ...i4 "
                         "strategies hold them")
    ap.add_argument("--tokenizer", help="'world', 'none', or a tokenizer file/directory to embed in GGUF or write "
                    "into an HF directory (default: the source's own, else World for 65536-row vocabularies)")
    ap.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.dst, to=args.to, dtype=args.dtype, tokenizer=args.tokenizer, force=args.force,
                progress=not args.quiet, note=(lambda text: None) if args.quiet else None)
    except ModelLoadError as exc:
        print(f"goose convert: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"goose convert: {exc.filename or args.dst}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
