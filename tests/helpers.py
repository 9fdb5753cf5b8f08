"""Shared test utilities."""

from __future__ import annotations

import torch

from autodeploy.numerics import rel_rms  # noqa: F401  (re-exported for the tests)


def hf_greedy(model, prompt, n):
    """HF generate with EOS disabled (our side uses ignore_eos), new tokens only."""
    gen = model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = None
    try:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        gen.eos_token_id = saved
    return out[0, len(prompt):].tolist()


def drive(engine, arrivals, max_steps: int = 5000):
    """Run an engine over ``arrivals`` = [(step, prompt, sampling)] (requests join at their step); returns the
    outputs in arrival order. Fails instead of hanging if the engine stops making progress."""
    reqs, step = [None] * len(arrivals), 0
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    while pending or engine.has_work():
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            reqs[i] = engine.add_request(arrivals[i][1], arrivals[i][2])
        engine.step()
        step += 1
        assert step < max_steps, "engine does not make progress"
    return [engine.output(r) for r in reqs]
