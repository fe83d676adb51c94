"""Engine-native request and output types: what the HTTP layer builds and what it receives back."""
from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequest
from engine.prefix_hash import ConvState

MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_LOGIT_BIAS = 1024
MAX_N = 16
SEED_MIN, SEED_MAX = -(2**53 - 1), 2**53 - 1
"""Seeds a JSON client can send exactly (JavaScript numbers and JSON Schema validators compare as float64)."""
_ids = itertools.count(1)


class FinishReason(str, enum.Enum):
    STOP = "stop"          # a stop string or stop token (end-of-text included)
    LENGTH = "length"      # max_tokens reached
    ABORT = "abort"        # aborted (client gone, shutdown); never shown to clients as a finish_reason


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; validated here, so the engine never sees a bad value."""
    max_tokens: int = 256
    """Tokens to generate at most (>= 0; 0 only makes sense with prompt logprobs)."""
    temperature: float = 1.0
    """0 (or anything below 1e-5) means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token that has appeared in the output (OpenAI semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the output (OpenAI semantics)."""
    penalty_decay: float = 1.0
    """RWKV-style: occurrence counts are multiplied by this after every token (1.0 = no decay)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits, bias in [-100, 100]."""
    banned_token_ids: tuple[int, ...] = ()
    """Never sampled."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on decoded text (they may span tokens); the output ends before them."""
    stop_token_ids: tuple[int, ...] = ()
    """Sampling one of these ends the sequence with finish_reason "stop" (end-of-text is always one)."""
    seed: int | None = None
    """Makes the output reproducible whatever else is in the batch."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0..20); None = no logprobs."""
    prompt_logprobs: int | None = None
    """Return logprobs for the prompt tokens (echo), with this many alternatives; the first is None."""
    ignore_eos: bool = False
    """Keep generating after end-of-text."""

    def __post_init__(self):
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens", "must be an integer >= 0")
        _check(_finite(self.temperature) and 0 <= self.temperature <= 2, "temperature", "must be in [0, 2]")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(_finite(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "must be in [-2, 2]")
        _check(_finite(self.penalty_decay) and 0 < self.penalty_decay <= 1, "penalty_decay", "must be in (0, 1]")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"may hold at most {MAX_LOGIT_BIAS} entries")
        for tok, bias in self.logit_bias:
            _check(_finite(bias) and -100 <= bias <= 100, "logit_bias", f"bias for token {tok} must be in [-100, 100]")
        _check(len(self.stop) <= MAX_STOP, "stop", f"may hold at most {MAX_STOP} strings (a chat template's own "
               f"stop strings count too)")
        for s in self.stop:
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN, "stop",
                   f"strings must be 1..{MAX_STOP_LEN} characters")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS), name,
                   f"must be between 0 and {MAX_LOGPROBS}")
        _check(self.seed is None or (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX), "seed",
               f"must be an integer between {SEED_MIN} and {SEED_MAX}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW are argmax too: dividing logits by them overflows float32."""
        return self.temperature < GREEDY_BELOW

    def check_token_ids(self, vocab_size: int) -> None:
        """Every token id named by the parameters lies in [0, vocab_size)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("banned_token_ids", self.banned_token_ids),
                          ("stop_token_ids", self.stop_token_ids)):
            for t in ids:
                _check(isinstance(t, int) and 0 <= t < vocab_size, name, f"token id {t} is outside [0, {vocab_size})")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(f"{param} {message}", param=param)


@dataclass
class GenerateRequest:
    """One completion request: n continuations of one prompt (given as token ids)."""
    prompt_tokens: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    constraint: object = None
    """An engine.structured Constraint (a JSON schema, regex, choice, grammar or tool calls) every sequence's
    output must match, or None for free text. Compiled at submit, off the event loop and the step loop."""
    initial: str = ""
    """The registered initial state (AsyncEngine.add_initial_state, e.g. a state-tuning file) the conversation
    starts from; "" = the zero state."""
    start: ConvState | None = None
    """Continue this conversation state: prompt_tokens come after start.prefix (start.initial must be initial)."""
    boundaries: tuple[int, ...] = ()
    """Positions in prompt_tokens where a message of the chat template ends: the prefix cache snapshots there and
    looks the stored states up there."""
    keep_state: bool = False
    """Hand back the state after the prompt and the output tokens fed to the model (all but the last one) with the
    last RequestOutput (RequestOutput.state); n must be 1."""

    def __post_init__(self):
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
        _check(len(self.prompt_tokens) > 0, "prompt", "must not be empty")
        _check(not self.keep_state or self.n == 1, "n", "must be 1 when the conversation state is kept")
        _check(self.start is None or isinstance(self.start, ConvState), "start", "must be a ConvState")
        _check(self.start is None or self.start.initial == self.initial, "start",
               "was made from another initial state than the request's")
        b = self.boundaries
        _check(all(0 < x < len(self.prompt_tokens) for x in b) and list(b) == sorted(set(b)), "boundaries",
               "must be increasing positions inside the prompt")


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability and the top alternatives at its position (most likely first)."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SequenceOutput:
    """What one of the n sequences produced since the previous RequestOutput."""
    index: int
    text: str                                   # newly released text (stop strings and after never included)
    token_ids: list[int]                        # newly sampled tokens
    logprobs: list[TokenLogprob] | None = None  # one per new token when logprobs were asked for
    finish_reason: FinishReason | None = None
    cumulative_tokens: int = 0                  # completion tokens of this sequence so far


@dataclass
class RequestOutput:
    """One update of a request: deltas of the sequences that moved; the last one has finished=True."""
    request_id: str
    outputs: list[SequenceOutput]
    prompt_tokens: int                                           # the context: start.prefix.length + the prompt
    prompt_logprobs: list[TokenLogprob | None] | None = None   # in the first update only, when asked for
    cached_prompt_tokens: int = 0                                # context tokens not run (the start, cached prefixes)
    finished: bool = False
    state: ConvState | None = None                               # the last update of a keep_state request


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health."""
    running: int
    waiting: int
    slots_total: int
    slots_used: int
    state_bytes_per_slot: int
    state_bytes_total: int
    prefix_cache_hits: int
    prefix_cache_misses: int
    prefix_cache_tokens_saved: int
    prefix_cache_bytes: int
    prefix_cache_entries: int
    prompt_tokens_total: int
    generated_tokens_total: int
    steps_total: int
    aborted_total: int
    alive: bool
    draining: bool
    threads: int = 0                  # CPU threads of the step loop's model calls (0 before it starts)
