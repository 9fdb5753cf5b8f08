"""User extension points for generation: logits processors and stopping criteria.

These are deliberately tiny so users can write them without knowing the engine.
The engine calls them once per decode step for each request that attaches them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "LogitsProcessor",
    "StoppingCriteria",
    "StopOnTokens",
    "StopOnStrings",
]


class LogitsProcessor:
    """Modifies next-token logits before penalties and sampling.

    Per-request form (default, ``batched = False``)::

        __call__(token_ids: list[int], logits: Tensor[V] fp32) -> Tensor[V]

    ``token_ids`` is the prompt followed by the tokens generated so far.

    Batched form (set ``batched = True``): the sampler calls the processor once per
    step for every request in the batch that attaches this same instance::

        __call__(token_ids: list[list[int]], logits: Tensor[B, V] fp32) -> Tensor[B, V]

    Return a tensor of the same shape (modifying ``logits`` in place and returning it
    is fine). Use ``float('-inf')`` to ban a token.
    """

    batched: bool = False

    def __call__(self, token_ids, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class StoppingCriteria:
    """Decides, after a token is chosen, whether a request stops now.

    ``__call__(token_ids: list[int], new_token: int) -> bool``: ``token_ids`` is the
    prompt followed by all generated tokens *including* ``new_token`` as its last
    element. Returning True stops the request; ``new_token`` is kept in the output.
    """

    def __call__(self, token_ids: list[int], new_token: int) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class StopOnTokens(StoppingCriteria):
    """Stop when the new token is one of ``ids`` (e.g. EOS or end-of-turn tokens)."""

    def __init__(self, ids: Iterable[int]):
        self.ids = frozenset(int(i) for i in ids)

    def __call__(self, token_ids: list[int], new_token: int) -> bool:
        return int(new_token) in self.ids


class StopOnStrings(StoppingCriteria):
    """Stop when the generated text contains one of ``strings``.

    The text is built incrementally (``runtime/detokenizer.py``), so a stop string split across tokens or
    inside a multi-byte character is found, each step costs a constant amount of decoding, and the text is
    exactly what the output and the stream show. ``detokenize`` is the tokenizer (or its ``decode``, or any
    ``decode(ids) -> str``). Prompt tokens are never searched, which is why ``prompt_len`` is needed; they give
    the first generated token its context (its leading space). One instance serves every sample of a request
    (one detokenizer per token list). After a stop, ``matched`` names the stop string and :meth:`trim` cuts a
    decoded output before it (the stop string itself is removed, as in the OpenAI/vLLM APIs).
    """

    def __init__(self, strings: Iterable[str], detokenize: Any, prompt_len: int = 0):
        self.strings = [s for s in strings]
        if not self.strings or any(not isinstance(s, str) or not s for s in self.strings):
            raise ValueError("StopOnStrings needs a non-empty list of non-empty strings")
        self.detokenize = detokenize
        self.prompt_len = int(prompt_len)
        self.matched: str | None = None
        # id(token list) -> (the list, its detokenizer); holding the list keeps its id from being reused
        self._texts: dict[int, tuple[list[int], Any]] = {}

    def _detokenizer(self, token_ids: list[int]):
        from autodeploy.runtime.detokenizer import IncrementalDetokenizer

        entry = self._texts.get(id(token_ids))
        if entry is None or entry[0] is not token_ids or self.prompt_len + entry[1].num_tokens > len(token_ids):
            d = IncrementalDetokenizer(self.detokenize, token_ids[:self.prompt_len], self.strings)
            self._texts[id(token_ids)] = (token_ids, d)
            return d
        return entry[1]

    def __call__(self, token_ids: list[int], new_token: int) -> bool:
        d = self._detokenizer(token_ids)
        for t in token_ids[self.prompt_len + d.num_tokens:]:
            d.add(t)
            if d.stopped:
                break
        if d.stopped:
            self.matched = d.matched
            return True
        return False

    def text(self, token_ids: list[int]) -> str:
        """The visible text generated so far in ``token_ids`` (cut before a matched stop string)."""
        return self._detokenizer(token_ids).text

    def trim(self, text: str) -> str:
        """Return ``text`` cut before the earliest occurrence of any stop string."""
        cut = len(text)
        for s in self.strings:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
        return text[:cut]
