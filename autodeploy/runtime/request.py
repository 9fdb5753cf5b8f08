"""Requests, their sequences and their outputs. Pure data: the scheduler and engine move them around."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_ids = itertools.count()


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Per-request timings (seconds, ``time.perf_counter`` clock)."""

    arrival: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None
    finished: Optional[float] = None
    num_prompt_tokens: int = 0
    num_generated: int = 0
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0

    @property
    def ttft(self) -> Optional[float]:
        """Time to first token."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> Optional[float]:
        """Mean time per output token after the first."""
        if self.finished is None or self.first_token is None or self.num_generated < 2:
            return None
        return (self.finished - self.first_token) / (self.num_generated - 1)

    def to_dict(self) -> dict:
        return {"ttft_s": self.ttft, "tpot_s": self.tpot, "tokens_generated": self.num_generated,
                "prompt_tokens": self.num_prompt_tokens, "preemptions": self.num_preemptions,
                "cached_prompt_tokens": self.num_cached_prompt_tokens}


@dataclass(eq=False)
class Sequence:
    """One stream of tokens with its own KV pages (a request has 1, or n, or beam_width of them)."""

    request: "Request"
    token_ids: list[int]
    prompt_len: int
    generator: Optional[torch.Generator] = None
    # sampled sequences: the Philox stream's seed (drawn at admission when the request has none) and the constant
    # part of the fused sampler's per-row parameters (backends/triton/kernels/sampling.py, param_row)
    seed: Optional[int] = None
    sample_params: Optional[list] = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_computed: int = 0
    state: SeqState = SeqState.WAITING
    finish_reason: Optional[str] = None
    # Per generated token (only when the request asks for logprobs): {token: logprob} for the sampled token and
    # the top-N alternatives; ``cumulative_logprob`` sums the sampled tokens' logprobs.
    logprobs: Optional[list[dict[int, float]]] = None
    cumulative_logprob: float = 0.0

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_pending(self) -> int:
        """Known tokens whose KV is not written yet (prompt remainder, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed


@dataclass(eq=False)
class Request:
    """A user request: a prompt, its sampling config, and the sequences generated for it."""

    request_id: Any
    prompt_ids: list[int]
    sampling: Any
    seqs: list[Sequence] = field(default_factory=list)
    beam: Any = None  # BeamSearchState for beam search
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    order: int = field(default_factory=lambda: next(_ids))
    error: Optional[str] = None
    stop_checkers: list = field(default_factory=list)  # generic StoppingCriteria (called per token)
    stop_ids: frozenset = frozenset()
    plain_greedy: bool = False  # greedy with no processors/penalties/logprobs/min_tokens: one batched argmax
    device_sampling: bool = False  # no processors/logprobs/min_tokens/beams: the fused sampling kernel (penalties too)
    new_tokens: list = field(default_factory=list)  # (sample index, token) produced since last read

    @property
    def finished(self) -> bool:
        if self.error is not None:
            return True
        for s in self.seqs:
            if s.state is not SeqState.FINISHED:
                return False
        return True

    def live_seqs(self) -> list[Sequence]:
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, without building a filtered list
            return seqs if seqs[0].state is not SeqState.FINISHED else []
        return [s for s in seqs if s.state is not SeqState.FINISHED]


@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's shape): its tokens, and per token ``{token: logprob}`` (the sampled token
    plus the top-N alternatives) when the request asked for logprobs."""

    index: int
    token_ids: list[int]
    logprobs: Optional[list[dict[int, float]]]
    cumulative_logprob: Optional[float]
    finish_reason: Optional[str]
    text: Optional[str] = None


@dataclass
class RequestOutput:
    """What ``generate`` returns per prompt. ``output_ids`` is the best (or only) sample; ``outputs`` holds every
    sample as a :class:`CompletionOutput`."""

    request_id: Any
    prompt_ids: list[int]
    output_ids: list[int]
    samples: list[list[int]]
    finish_reason: Optional[str]
    metrics: RequestMetrics
    error: Optional[str] = None
    text: Optional[str] = None
    texts: Optional[list[str]] = None
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One generated token of one request, as :class:`~autodeploy.runtime.service.RequestStream` yields it.

    ``index`` is the sample index (n > 1). ``logprob``/``top_logprobs`` are set when the request asked for
    logprobs (``top_logprobs`` only for ``logprobs >= 1``). The request's last event has ``finished=True``,
    its ``finish_reason`` and the full ``output``; a request that ends without a new token (abort, error)
    ends with an event whose ``token_id`` is -1.
    """

    request_id: Any
    index: int
    token_id: int
    logprob: Optional[float]
    top_logprobs: Optional[dict[int, float]]
    finished: bool
    finish_reason: Optional[str]
    output: Optional[RequestOutput] = None
    # this is the last token of sample ``index`` (its text can be flushed); ``finish_reason`` is then that
    # sample's own, also on events before the request's last
    sample_finished: bool = False
