"""Batched next-token masks: fill the constrained rows' bitmasks (in parallel, off the GIL), then apply them to
the logits in place. Rows without a matcher are neither filled nor touched.

The two halves are split so the engine can fill the masks of step t+1 while the model runs step t's forward:
a mask depends only on the tokens a matcher has accepted, never on the logits.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import llguidance
import torch

from kernels import native

from engine.structured.matcher import Matcher

# [256, 8] float32: for a mask byte, 0 where its bit i is set (allowed) and -inf where not. Adding these rows to
# the logits masks them: ~2 ms for 64 x 65536 on an idle core, where unpacking the bits with shifts takes ~30 ms.
_BYTE_TO_BIAS = torch.where(((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))
_SHIFTS = torch.arange(32, dtype=torch.int32)


@dataclass
class MaskBatch:
    """Masks of the constrained rows of one step's batch."""
    rows: list[int]
    """Batch rows with a matcher, ascending."""
    bits: torch.Tensor
    """[len(rows), ceil(V / 32)] int32: bit k of word j allows token 32 * j + k."""
    errors: dict[int, str] = field(default_factory=dict)
    """Batch row -> why its grammar failed (a work limit): fail that sequence; its mask allows only end-of-text."""

    def row(self, j: int) -> MaskBatch | None:
        """The mask of batch row ``j`` alone, as a batch of one (None when that row is free)."""
        if j not in self.rows:
            return None
        k = self.rows.index(j)
        return MaskBatch([0], self.bits[k:k + 1])


class MaskFiller:
    """Fills masks for a batch of matchers with llguidance's thread pool (one per engine)."""

    def __init__(self, threads: int | None = None):
        self._executor = llguidance.LLExecutor(threads)

    def fill(self, matchers: Sequence[Matcher | None]) -> MaskBatch | None:
        """Masks for the rows whose matcher is not None (row i of the batch = matchers[i]); None when no row is
        constrained. Reads only the matchers' accepted tokens."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        words = -(-matchers[rows[0]].vocab.vocab_size // 32)
        bits = torch.empty(len(rows), words, dtype=torch.int32)
        jobs = [(matchers[r].ll, k) for k, r in enumerate(rows)]
        # writes row k at bits.data_ptr() + k * words * 4 from llguidance's threads, without the GIL
        self._executor.unsafe_compute_mask_ptr(jobs, bits.data_ptr(), words * 4, len(rows))
        errors = {r: matchers[r].error for r in rows if matchers[r].ll.is_error()}
        return MaskBatch(rows, bits, errors)


def apply_mask(logits: torch.Tensor, batch: MaskBatch | None) -> None:
    """Set the disallowed logits of the constrained rows to -inf, in place. ``logits`` is [B, V] float32 on the
    CPU with B = the length of the list given to fill; columns past the grammar's vocabulary are masked too.
    The native kernel does it in one pass over each mask when it is loaded (kernels/native.py); else:

    Masks inside JSON usually allow a handful of tokens, so when few mask words are non-zero the allowed logits
    are saved, the rows filled with -inf and the saved values put back; otherwise a 0/-inf bias is added."""
    if batch is None:
        return
    if logits.dtype == torch.float32 and logits.stride(1) == 1 and native.available():
        native.apply_token_mask(logits, torch.tensor(batch.rows), batch.bits)   # one pass over each mask
        return
    if int(torch.count_nonzero(batch.bits)) * SPARSE_BELOW <= batch.bits.numel():
        _apply_sparse(logits, batch)
    else:
        _apply_dense(logits, batch)


SPARSE_BELOW = 8
"""The sparse path is taken when at most 1/8 of the mask words allow anything."""


def _apply_sparse(logits: torch.Tensor, batch: MaskBatch) -> None:
    rows = torch.tensor(batch.rows)
    nz = batch.bits.nonzero()                                 # [N, 2] (row k, word j) of non-zero words
    words = batch.bits[nz[:, 0], nz[:, 1]]
    k, bit = ((words.unsqueeze(1) >> _SHIFTS) & 1).nonzero(as_tuple=True)
    r, tok = rows[nz[k, 0]], nz[k, 1] * 32 + bit               # every allowed (batch row, token)
    inside = tok < logits.shape[1]
    r, tok = r[inside], tok[inside]
    kept = logits[r, tok]
    logits.index_fill_(0, rows, float("-inf"))
    logits[r, tok] = kept


def _apply_dense(logits: torch.Tensor, batch: MaskBatch) -> None:
    B, V = logits.shape
    R, W = batch.bits.shape
    bias = _bias(batch.bits)                                  # [R, 32 W] of 0 / -inf
    width = min(V, 32 * W)
    if width < bias.shape[1]:
        bias = bias[:, :width]
    if batch.rows == list(range(B)):
        logits[:, :width] += bias
        if width < V:
            logits[:, width:] = float("-inf")
        return
    idx = torch.tensor(batch.rows)
    logits[:, :width].index_add_(0, idx, bias)
    if width < V:
        logits[idx, width:] = float("-inf")


def _bias(bits: torch.Tensor) -> torch.Tensor:
    R, W = bits.shape
    if sys.byteorder == "little":                             # byte b of a word holds bits 8b..8b+7
        return torch.index_select(_BYTE_TO_BIAS, 0, bits.view(torch.uint8).flatten().int()).view(R, 32 * W)
    allowed = ((bits.unsqueeze(-1) >> _SHIFTS) & 1).view(R, 32 * W).bool()
    return torch.where(allowed, 0.0, float("-inf"))
