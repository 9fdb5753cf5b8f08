"""Incremental detokenization: text for a stream of token ids that is right for every tokenizer kind.

Decoding one token at a time is wrong twice over: with byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2) one
character may span several tokens, so a lone token decodes to U+FFFD; with Metaspace/SentencePiece (Llama-2,
Mistral) the decoder strips the leading space of the first token it sees, so every word loses its space.

The method (the one vLLM uses, written here from its description): keep a small window of already-emitted
tokens as context, decode the window with and without the new tokens, and emit only the difference, once it
no longer ends in U+FFFD (an incomplete character). The first window starts inside the prompt, so the first
generated word keeps its leading space. ``tokenizers.decoders.DecodeStream`` does the same inside the Rust
tokenizer, but only for fast tokenizers and without a prompt context; this works with any ``decode``.

Stop strings are matched on the text as it grows (a stop string split across tokens included); the text is cut
before the stop string. While a stop string could still be forming, its possible beginning is held back, so
the streamed pieces concatenated always equal the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

__all__ = ["IncrementalDetokenizer", "TextStreams", "detokenize", "decode_fn", "fill_text"]

CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first generated token
_INCOMPLETE = "\ufffd"


def decode_fn(tokenizer_or_decode: Any, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """A ``decode(ids) -> str`` for a tokenizer (special tokens skipped, no space clean-up: clean-up is not
    additive across windows) or a plain ``decode`` callable. A tokenizer's bound ``decode`` method counts as
    the tokenizer (so skip/clean-up options apply to it too)."""
    owner = getattr(tokenizer_or_decode, "__self__", None)
    if getattr(tokenizer_or_decode, "__name__", "") == "decode" and hasattr(owner, "convert_ids_to_tokens"):
        tokenizer_or_decode = owner
    decode = getattr(tokenizer_or_decode, "decode", None)
    if decode is None:
        if not callable(tokenizer_or_decode):
            raise TypeError(f"expected a tokenizer or a decode(ids) callable, got {type(tokenizer_or_decode).__name__}")
        return tokenizer_or_decode
    tok = tokenizer_or_decode

    def _decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    return _decode


class IncrementalDetokenizer:
    """The text of one generated sequence, token by token.

    ``add(token)`` returns the newly visible text ('' while a character is incomplete or a stop string may be
    forming); ``finish()`` returns whatever was held back. ``text`` is the whole visible text so far (cut before
    a matched stop string); ``stopped``/``matched`` say whether and which stop string ended it.
    """

    def __init__(self, tokenizer_or_decode: Any, prompt_ids: Sequence[int] = (), stop_strings: Iterable[str] = (),
                 skip_special_tokens: bool = True):
        self._decode = decode_fn(tokenizer_or_decode, skip_special_tokens)
        self._ids: list[int] = list(prompt_ids)[-CONTEXT_TOKENS:]
        self._prefix = 0  # window start: tokens before it are emitted and no longer decoded
        self._read = len(self._ids)  # tokens before it have had their text added
        self._prefix_text = self._decode(self._ids) if self._ids else ""
        self.stop_strings = [s for s in stop_strings if s]
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self.text = ""
        self._emitted = 0
        self.num_tokens = 0  # generated tokens consumed
        self.matched: Optional[str] = None
        self._done = False

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def add(self, token: int) -> str:
        if self._done:
            return ""
        self.num_tokens += 1
        self._ids.append(int(token))
        full = self._decode(self._ids[self._prefix:])
        if len(full) > len(self._prefix_text) and not full.endswith(_INCOMPLETE):
            self._extend(full[len(self._prefix_text):])
            # The tokens read so far become the next window's context.
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        return self._release()

    def finish(self) -> str:
        """End of the sequence: emit held-back text (an incomplete character comes out as U+FFFD, as a full
        decode would show it)."""
        if not self._done and self._read < len(self._ids):
            full = self._decode(self._ids[self._prefix:])
            if len(full) > len(self._prefix_text):
                self._extend(full[len(self._prefix_text):])
            self._read = len(self._ids)
        self._done = True
        return self._release()

    def _extend(self, new: str) -> None:
        start = max(0, len(self.text) - self._longest + 1)
        self.text += new
        if not self.stop_strings:
            return
        hits = [(pos, s) for s in self.stop_strings if (pos := self.text.find(s, start)) != -1]
        if hits:
            pos, self.matched = min(hits)
            self.text = self.text[:pos]
            self._done = True

    def _held(self) -> int:
        """Characters at the end of ``text`` that could begin a stop string: not shown yet."""
        if self._done or not self.stop_strings:
            return 0
        for k in range(min(len(self.text), self._longest - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0

    def _release(self) -> str:
        limit = len(self.text) - self._held()
        if limit <= self._emitted:
            return ""
        out, self._emitted = self.text[self._emitted:limit], limit
        return out


def detokenize(tokenizer_or_decode: Any, prompt_ids: Sequence[int], output_ids: Sequence[int],
               stop_strings: Iterable[str] = (), skip_special_tokens: bool = True) -> tuple[str, Optional[str]]:
    """The final text of ``output_ids`` and the stop string that cut it (or None): exactly what streaming the
    same tokens through an :class:`IncrementalDetokenizer` shows."""
    d = IncrementalDetokenizer(tokenizer_or_decode, prompt_ids, stop_strings, skip_special_tokens)
    for t in output_ids:
        d.add(t)
        if d.stopped:
            break
    d.finish()
    return d.text, d.matched


def fill_text(output: Any, tokenizer: Any, stop_strings: Iterable[str] = ()) -> Any:
    """Set the text fields of a ``RequestOutput`` (``text``, ``texts`` and each ``outputs[i].text``) from its
    token ids, the way streaming shows them. No tokenizer: leaves them as they are."""
    if tokenizer is None or getattr(output, "error", None):
        return output
    stops = list(stop_strings)
    samples = list(getattr(output, "samples", None) or [output.output_ids])
    texts = [detokenize(tokenizer, output.prompt_ids, ids, stops)[0] for ids in samples]
    output.texts = texts
    output.text = texts[0] if texts else ""
    for i, completion in enumerate(getattr(output, "outputs", None) or []):
        if i < len(texts) and list(completion.token_ids) == list(samples[i]):
            completion.text = texts[i]
        else:
            completion.text = detokenize(tokenizer, output.prompt_ids, completion.token_ids, stops)[0]
    return output


class TextStreams:
    """The text side of a token stream: one :class:`IncrementalDetokenizer` per (request, sample).

    Call :meth:`add` for every streamed token with ``last=True`` on the sample's last token; it returns the
    text to show for that token (possibly ''). Without a tokenizer it returns None.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._open: dict[Any, IncrementalDetokenizer] = {}

    def add(self, key: Any, token: Optional[int], *, prompt_ids: Sequence[int], stop_strings: Iterable[str] = (),
            last: bool = False) -> Optional[str]:
        """``token`` None or negative: no new token (a request that ended without one); flushes when ``last``."""
        if self.tokenizer is None:
            return None
        d = self._open.get(key)
        if d is None:
            d = self._open[key] = IncrementalDetokenizer(self.tokenizer, prompt_ids, stop_strings)
        text = d.add(token) if token is not None and token >= 0 else ""
        if last:
            text += d.finish()
            del self._open[key]
        return text

    def close(self, key: Any) -> Optional[str]:
        """Flush and forget ``key`` (a sample that ended without a last-token event)."""
        d = self._open.pop(key, None)
        return d.finish() if d is not None else None

    def keys(self) -> list[Any]:
        return list(self._open)
