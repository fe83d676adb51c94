"""Embedding jobs: pooled final hidden states, inputs grouped by length, one chunk of one batch per engine step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

POOLINGS = ("last", "mean")


@dataclass
class EmbedJob:
    """Inputs grouped by length into batches; one chunk of one batch runs per engine step."""
    inputs: list[list[int]]
    pooling: str
    sink: object                                              # engine.streams.Sink
    results: dict[int, list[float]] = field(default_factory=dict)
    batches: list[list[int]] = field(default_factory=list)    # input indexes of equal length
    position: int = 0                                         # tokens done in the current batch
    state: object = None
    total: object = None

    def __post_init__(self):
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(self.inputs):
            by_len.setdefault(len(ids), []).append(i)
        self.batches = list(by_len.values())

    @property
    def done(self) -> bool:
        return not self.batches

    def vectors(self) -> list[list[float]]:
        return [self.results[i] for i in range(len(self.inputs))]


def run_chunk(model, job: EmbedJob, chunk: int) -> None:
    """Run at most ``chunk`` tokens of the job's current equal-length batch; L2-normalised vectors when it ends."""
    batch = job.batches[0]
    length = len(job.inputs[batch[0]])
    if job.position == 0:
        job.state, job.total = model.zero_state(len(batch)), None
    end = min(length, job.position + chunk)
    tokens = torch.tensor([job.inputs[i][job.position:end] for i in batch], device=model.device)
    mean = job.pooling == "mean"
    hidden, job.state = model.forward_hidden(tokens, job.state, full_output=mean)   # [k, (T,) C]
    part = hidden.sum(1) if mean else hidden
    job.total = part if (job.total is None or not mean) else job.total + part
    job.position = end
    if end == length:
        vecs = job.total / length if mean else job.total
        vecs = torch.nn.functional.normalize(vecs.float(), dim=-1).cpu()
        for i, vec in zip(batch, vecs):
            job.results[i] = vec.tolist()
        job.batches.pop(0)
        job.position, job.state, job.total = 0, None, None
