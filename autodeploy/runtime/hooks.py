"""User extension points for generation: logits processors and stopping criteria.

These are deliberately tiny so users can write them without knowing the engine.
The engine calls them once per decode step for each request that attaches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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

    Only the tail of the generated tokens is detokenized each step (so the cost does
    not grow with the output length); prompt tokens are never searched, which is why
    ``prompt_len`` is needed. After a stop, ``matched`` names the stop string and
    :meth:`trim` cuts a decoded output at it (the stop string itself is removed, as in
    the OpenAI/vLLM APIs).
    """

    def __init__(
        self,
        strings: Iterable[str],
        detokenize: Callable[[list[int]], str],
        prompt_len: int = 0,
        tail_tokens: int | None = None,
    ):
        self.strings = [s for s in strings]
        if not self.strings or any(not isinstance(s, str) or not s for s in self.strings):
            raise ValueError("StopOnStrings needs a non-empty list of non-empty strings")
        self.detokenize = detokenize
        self.prompt_len = int(prompt_len)
        # A stop string of L characters spans at most L tokens when every token yields
        # at least one character; the slack covers tokens that decode to nothing alone
        # (partial UTF-8 byte tokens) and tokenizers that drop a leading space.
        self.tail_tokens = tail_tokens or max(len(s) for s in self.strings) + 4
        self.matched: str | None = None

    def __call__(self, token_ids: list[int], new_token: int) -> bool:
        generated = token_ids[self.prompt_len :]
        tail = self.detokenize(list(generated[-self.tail_tokens :]))
        for s in self.strings:
            if s in tail:
                self.matched = s
                return True
        return False

    def trim(self, text: str) -> str:
        """Return ``text`` cut before the earliest occurrence of any stop string."""
        cut = len(text)
        for s in self.strings:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
        return text[:cut]
