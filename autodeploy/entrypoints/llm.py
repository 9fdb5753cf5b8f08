"""``autodeploy.LLM``: compile once, then serve many requests with in-flight batching.

Prompts may be strings (encoded with the model's local tokenizer) or token-id lists; ``chat`` applies the
model's chat template. Error rule (the same for ``LLM.generate``, ``generate_stream``, ``chat`` and
``CompiledModel.generate``): invalid input (an empty prompt, an out-of-vocabulary id, a prompt longer than
``max_seq_len``, a bad sampling value) raises :class:`~autodeploy.errors.InvalidRequestError` naming the prompt
before any work starts; a request that fails while running (e.g. it outgrows the KV cache) comes back with
``output.error`` and ``finish_reason == "error"`` while the others complete.

Text (``output.text``, ``output.outputs[i].text``, streamed ``event.text``) is decoded incrementally
(``runtime/detokenizer.py``): the streamed pieces of a sample concatenated equal its final text.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Iterator, Optional, Sequence

from autodeploy.errors import InvalidRequestError
from autodeploy.runtime.detokenizer import TextStreams
from autodeploy.runtime.engine import Engine, per_prompt_configs
from autodeploy.runtime.request import RequestOutput
from autodeploy.runtime.sampling import SamplingConfig

log = logging.getLogger(__name__)
_SERVICE_LOCK = threading.Lock()  # one EngineService per engine, even when threads race to start it


@dataclass
class StreamEvent:
    """One generated token of one request (``index`` is the sample index for n > 1)."""

    request_id: Any
    index: int
    token_id: int
    text: Optional[str]
    finished: bool
    output: Optional[RequestOutput] = None


class LLM:
    """``model_or_path``: an HF model instance, a local checkpoint directory, ``"smollm2"`` (the bundled default,
    a real chat model), ``"builtin:NAME"`` (random weights), or an already compiled model. ``tokenizer``: a
    tokenizer object or a local directory holding one (default: the checkpoint's own). ``compile_options`` go to
    ``autodeploy.compile``."""

    def __init__(self, model_or_path: Any = "smollm2", tokenizer: Any = None, logits_processors: Sequence[Any] = (),
                 stopping_criteria: Sequence[Any] = (), **compile_options: Any):
        from autodeploy.compiler.driver import compile as ad_compile
        from autodeploy.runtime.compiled_model import CompiledModel

        if isinstance(model_or_path, CompiledModel):
            if compile_options:
                raise InvalidRequestError(
                    f"LLM(compiled_model) takes no compile options, got {sorted(compile_options)}")
            self.compiled = model_or_path
        else:
            self.compiled = ad_compile(model_or_path, **compile_options)
        self.tokenizer = _load_tokenizer(tokenizer) if tokenizer is not None else self.compiled.info.tokenizer
        self.engine = Engine(self.compiled, logits_processors=logits_processors,
                             stopping_criteria=stopping_criteria, tokenizer=self.tokenizer)
        gen = self.compiled.info.generation_config
        self.default_sampling = SamplingConfig.from_generation_config(gen) if gen is not None else SamplingConfig()

    def explain(self) -> str:
        return self.compiled.explain()

    # -- inputs --------------------------------------------------------------------------------------------
    def _encode(self, prompt: Any) -> Any:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("string prompts need a tokenizer; pass token ids or tokenizer=...")
            return self.tokenizer.encode(prompt)
        return prompt

    def _prepare(self, prompts: Sequence[Any] | str, sampling: Any) -> list[tuple[list[int], SamplingConfig]]:
        """Encode and check every prompt before any is submitted (the module's error rule): raises
        InvalidRequestError naming the first bad prompt."""
        if hasattr(prompts, "dim") and hasattr(prompts, "tolist"):  # a tensor: one prompt, or one per row
            prompts = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
        if prompts is None or isinstance(prompts, (dict, int, float)) or not hasattr(prompts, "__iter__"):
            raise InvalidRequestError("prompts must be a string, a list of token ids, or a list of strings / "
                                      f"token-id lists; got {type(prompts).__name__}")
        if isinstance(prompts, (str, bytes)):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], int) and not isinstance(prompts[0], bool):
            prompts = [prompts]
        configs = per_prompt_configs(sampling, len(prompts), self.default_sampling)
        prepared = []
        for i, (prompt, cfg) in enumerate(zip(prompts, configs)):
            try:
                prepared.append((self.engine.validate(self._encode(prompt), cfg), cfg))
            except InvalidRequestError as exc:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise type(exc)(f"{where}{exc}") from None
        return prepared

    def _submit(self, prompts: Sequence[Any], sampling: Any) -> list[Any]:
        """Check every prompt (raising before any is added, see the module's error rule), then submit them all to
        the engine's owner (:class:`~autodeploy.runtime.service.EngineService`, started on first use): any number
        of threads may call ``generate``/``generate_stream`` at once, each gets its own requests' outputs."""
        from autodeploy.runtime.service import EngineService

        prepared = self._prepare(prompts, sampling)
        with _SERVICE_LOCK:
            service = self.engine.service
            if service is None or service.closed:
                service = EngineService(self.engine)
        streams: list[Any] = []
        try:
            for ids, cfg in prepared:
                streams.append(service.submit(ids, cfg))
        except BaseException:
            for st in streams:
                service.abort(st.request_id)
            raise
        return streams

    # -- API -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any] | str, sampling: Any = None) -> list[RequestOutput]:
        """Run all prompts to completion; outputs come back in prompt order. Thread-safe. Interrupted (e.g.
        KeyboardInterrupt), the call aborts its own requests and re-raises."""
        streams = self._submit(prompts, sampling)
        try:
            outs = [st.result() for st in streams]
        except BaseException:
            service = self.engine.service
            for st in streams:
                if service is not None:
                    service.abort(st.request_id)
            raise
        return outs  # text filled by the engine (Engine.output: the detokenizer's one rule)

    def chat(self, messages: Sequence[Any], sampling: Any = None, *, add_generation_prompt: bool = True,
             chat_template_kwargs: Optional[dict] = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` dicts) or a list of them, with the model's
        chat template. Returns one output per conversation; ``out.text`` is the assistant's reply."""
        if not messages:
            raise InvalidRequestError("chat needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        return self.generate([self.chat_prompt(c, add_generation_prompt=add_generation_prompt,
                                               **(chat_template_kwargs or {})) for c in conversations], sampling)

    def chat_prompt(self, conversation: Sequence[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """The token ids of ``conversation`` under the model's chat template."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise InvalidRequestError("chat needs a tokenizer with a chat template; this model has "
                                      + ("no tokenizer" if tok is None else "a tokenizer without chat_template")
                                      + " (use generate with a plain prompt)")
        if not conversation or any(not isinstance(m, dict) or "role" not in m or "content" not in m
                                   for m in conversation):
            raise InvalidRequestError("a conversation is a non-empty list of {'role': ..., 'content': ...} dicts")
        ids = tok.apply_chat_template(list(conversation), add_generation_prompt=add_generation_prompt, tokenize=True,
                                      **kwargs)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def generate_stream(self, prompts: Sequence[Any] | str, sampling: Any = None) -> Iterator[StreamEvent]:
        """Yield tokens as they are produced (requests interleaved as the engine makes them); each request's last
        event carries its full output. Thread-safe; closing the generator early aborts the requests left."""
        from autodeploy.runtime.service import merge_streams

        streams = self._submit(prompts, sampling)
        by_id = {st.request_id: st for st in streams}
        texts = TextStreams(self.tokenizer)
        left = set(by_id)
        try:
            for ev in merge_streams(streams):
                st = by_id[ev.request_id]
                text = stream_text(texts, ev.request_id, ev.index, ev.token_id, prompt_ids=st.prompt_ids,
                                   stop_strings=st.sampling.stop_strings, last=ev.finished or ev.sample_finished)
                if ev.finished:
                    left.discard(ev.request_id)
                    for key in [k for k in texts.keys() if k[0] == ev.request_id]:
                        texts.close(key)
                yield StreamEvent(ev.request_id, ev.index, ev.token_id, text, ev.finished,
                                  ev.output if ev.finished else None)
        finally:
            service = self.engine.service
            for rid in left:
                if service is not None:
                    service.abort(rid)


def stream_text(texts: TextStreams, request_id: Any, index: int, token_id: Optional[int], *,
                prompt_ids: Sequence[int], stop_strings: Sequence[str] = (), last: bool) -> Optional[str]:
    """The text to show with one streamed token (None without a tokenizer). ``last``: the sample's last token
    (or the request's end): held-back text is flushed. The pieces of a sample add up to its final
    ``output.outputs[index].text``."""
    return texts.add((request_id, index), token_id, prompt_ids=prompt_ids, stop_strings=stop_strings, last=last)


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given, or one loaded from a local directory."""
    import os

    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        path = os.fspath(tokenizer)
        if not os.path.isdir(path):
            raise InvalidRequestError(f"tokenizer {path!r} is not a local directory with tokenizer files")
        return AutoTokenizer.from_pretrained(path)
    return tokenizer
