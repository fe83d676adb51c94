"""The per-token update: a request's sequences, the finish rules for each sampled token, and the RequestOutput
deltas delivered to the caller. Pure bookkeeping on Python objects (no model calls); the step loop calls it, and so
can a stand-in engine in tests, so both follow the same rules."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request import FinishReason, GenerateRequest, RequestOutput, SamplingParams, SequenceOutput
from engine.sampling import SamplerRow, make_generator
from engine.text.stop import TextStream


@dataclass
class Sequence:
    """One of a request's n continuations."""
    index: int
    row: SamplerRow
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    pending: int | None = None          # sampled, not yet fed to the model
    finished: FinishReason | None = None
    delta: str = ""                     # text released since the last delivery
    released: bool = False              # its state row has been given back
    matcher: object = None              # engine.structured.Matcher when the output is constrained


@dataclass
class Group:
    """One request in the engine: its prompt, its sequences once decoding starts, and where its outputs go."""
    request: GenerateRequest
    sink: object                        # engine.streams.Sink
    seqs: list[Sequence] = field(default_factory=list)
    cached: int = 0                     # prompt tokens resumed from the prefix cache
    prompt_logprobs: list | None = None
    sent_prompt: bool = False
    waiting: bool = True                # counted against max_waiting (until it gets slots or ends)
    grammar: object = None              # engine.structured.CompiledGrammar of the request's constraint
    hashes: object = None               # engine.prefix_hash.PrefixHashes of the prompt (after the start)
    stored: object = None               # engine.prefix_cache.Hit found in the state store at submit
    first_logits: object = None         # the prompt's last logits when the cache covered all of it
    kept: object = None                 # engine.prefix_hash.ConvState handed back (keep_state)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def key(self, index: int) -> tuple[str, int]:
        """The state-pool key of sequence ``index``."""
        return (self.id, index)

    @property
    def started_at(self) -> int:
        """Context tokens before the prompt (the start state's)."""
        return self.request.start.prefix.length if self.request.start is not None else 0

    @property
    def done(self) -> bool:
        return bool(self.seqs) and all(s.finished is not None for s in self.seqs)


def start_sequences(g: Group, tokenizer, vocab_size: int) -> None:
    """The prompt is in the state: make the group's n sequences (sampler rows with their seeds, text streams)."""
    p = g.params
    for i in range(g.request.n):
        counts = torch.zeros(vocab_size) if p.presence_penalty or p.frequency_penalty else None
        row = SamplerRow(p, make_generator(p.seed, i), counts)
        matcher = g.grammar.matcher() if g.grammar is not None else None
        g.seqs.append(Sequence(i, row, TextStream(tokenizer.stream_decoder(), p.stop), matcher=matcher))
    if p.max_tokens == 0:
        for s in g.seqs:
            s.finished = FinishReason.LENGTH


def advance(s: Sequence, params: SamplingParams, tok: int, eot_id: int) -> None:
    """Record a sampled token and apply the finish rules: end-of-text or a stop token, a stop string in the
    decoded text (the text stops before it), the end of the output's grammar, or max_tokens. A token the grammar
    rejects raises RequestFailed (the mask was not applied)."""
    s.tokens.append(tok)
    s.pending = tok
    s.delta = ""
    if (tok == eot_id and not params.ignore_eos) or tok in params.stop_token_ids:
        s.finished = FinishReason.STOP
        s.delta = s.text.finish()
        return
    if s.matcher is not None:
        s.matcher.accept(tok)
    text, stopped = s.text.push(tok)
    s.delta = text
    if stopped:
        s.finished = FinishReason.STOP
    elif s.matcher is not None and s.matcher.is_finished:
        s.finished = FinishReason.STOP
        s.delta += s.text.finish()
    elif len(s.tokens) >= params.max_tokens:
        s.finished = FinishReason.LENGTH
        s.delta += s.text.finish()
        if s.text.stopped:
            s.finished = FinishReason.STOP


def take_output(g: Group, new: dict[int, list]) -> RequestOutput:
    """The RequestOutput carrying each sequence's new tokens ((token, logprob) pairs in ``new``) and text delta."""
    want_lp = g.params.logprobs is not None
    outputs = []
    for s in g.seqs:
        if s.index not in new:
            continue
        items = new[s.index]
        outputs.append(SequenceOutput(
            index=s.index, text=s.delta, token_ids=[t for t, _ in items],
            logprobs=[lp for _, lp in items] if want_lp else None,
            finish_reason=s.finished if s.finished and s.finished is not FinishReason.ABORT else None,
            cumulative_tokens=len(s.tokens)))
        s.delta = ""
    out = RequestOutput(request_id=g.id, outputs=outputs, prompt_tokens=g.started_at + len(g.request.prompt_tokens),
                        cached_prompt_tokens=g.started_at + g.cached, finished=g.done,
                        state=g.kept if g.done else None)
    if not g.sent_prompt:
        out.prompt_logprobs = g.prompt_logprobs
        g.sent_prompt = True
    return out


def abort_output(g: Group) -> RequestOutput:
    """The last output of an aborted request: its unfinished sequences end with ABORT."""
    return RequestOutput(request_id=g.id, prompt_tokens=g.started_at + len(g.request.prompt_tokens), finished=True,
                         cached_prompt_tokens=g.started_at + g.cached,
                         outputs=[SequenceOutput(index=s.index, text="", token_ids=[],
                                                 finish_reason=FinishReason.ABORT, cumulative_tokens=len(s.tokens))
                                  for s in g.seqs if s.finished is None])
