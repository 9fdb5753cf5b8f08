"""``autodeploy.LLM``: compile once, then serve many requests with in-flight batching.

Prompts may be strings (encoded with the model's local tokenizer) or token-id lists. A bad request gets its
own error in its output while the rest of the batch completes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from autodeploy.errors import AutoDeployError, InvalidRequestError
from autodeploy.runtime.engine import Engine, per_prompt_configs
from autodeploy.runtime.request import RequestMetrics, RequestOutput
from autodeploy.runtime.sampling import SamplingConfig

log = logging.getLogger(__name__)


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
    def __init__(self, model_or_path: Any, tokenizer: Any = None, logits_processors: Sequence[Any] = (),
                 stopping_criteria: Sequence[Any] = (), **compile_options: Any):
        from autodeploy.compiler.driver import compile as ad_compile

        self.compiled = ad_compile(model_or_path, **compile_options)
        self.tokenizer = tokenizer if tokenizer is not None else self.compiled.info.tokenizer
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

    def _submit(self, prompts: Sequence[Any], sampling: Any) -> list[Any]:
        """Add every valid request; invalid ones become finished outputs with their error."""
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        handles: list[Any] = []
        for prompt, cfg in zip(prompts, per_prompt_configs(sampling, len(prompts), self.default_sampling)):
            try:
                handles.append(self.engine.add_request(self._encode(prompt), cfg))
            except AutoDeployError as exc:
                handles.append(RequestOutput(request_id=None, prompt_ids=[], output_ids=[], samples=[],
                                             finish_reason="error", metrics=RequestMetrics(), error=str(exc)))
                log.warning("rejected request: %s", exc)
        return handles

    # -- API -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any] | str, sampling: Any = None) -> list[RequestOutput]:
        """Run all prompts to completion; outputs come back in prompt order."""
        handles = self._submit(prompts, sampling)
        self.engine.run_until_done()
        return [h if isinstance(h, RequestOutput) else self.engine.output(h) for h in handles]

    def generate_stream(self, prompts: Sequence[Any] | str, sampling: Any = None) -> Iterator[StreamEvent]:
        """Yield tokens as they are produced; each request's last event carries its full output."""
        handles = self._submit(prompts, sampling)
        for h in handles:
            if isinstance(h, RequestOutput):
                yield StreamEvent(None, 0, -1, None, True, h)
        for req, index, tok, done in self.engine.stream():
            text = self.tokenizer.decode([tok]) if self.tokenizer is not None else None
            yield StreamEvent(req.request_id, index, tok, text, done, self.engine.output(req) if done else None)
