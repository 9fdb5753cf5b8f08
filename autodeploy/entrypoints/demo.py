"""The README's first command: compile SmolLM2 (a real chat model), answer a question, check the compiled model
against HF eager on the same weights (logits and greedy tokens), and report tokens/s and the compile report.

Sized for a 2-core CPU: a short context, a few prompts and a few dozen tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from autodeploy.numerics import rel_rms

QUESTION = "What is the capital of France?"
PARITY_PROMPTS = ["What is the capital of France?", "Name three colors of the rainbow.",
                  "Write one sentence about the sea."]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(max_seq_len=256, max_batch_size=4)
    p.add_argument("--question", default=QUESTION, help="what to ask the model")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (parity and speed runs)")
    p.add_argument("--num-prompts", type=int, default=3, help="prompts in the parity and speed runs")


def _hf_eager(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights with HF's eager attention: the reference every check compares with."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    return model


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from autodeploy.entrypoints.common import compile_from_args
    from autodeploy.entrypoints.llm import LLM
    from autodeploy.errors import InvalidRequestError
    from autodeploy.metadata import SequenceChunk
    from autodeploy.runtime.sampling import SamplingConfig

    console = Console()
    t_start = time.perf_counter()
    with console.status(f"loading and compiling {args.model}..."):
        t0 = time.perf_counter()
        model, cm = compile_from_args(args)
        compile_s = time.perf_counter() - t0
    console.print(f"loaded and compiled {cm.info.name} ({cm.info.num_layers} layers, {cm.dtype}) in {compile_s:.1f} s")
    llm = LLM(cm)
    if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
        raise InvalidRequestError(f"the demo needs a chat model with a tokenizer; {args.model} has none "
                                  "(try --model smollm2)")

    # parity with HF eager on the same weights: logits of every prompt in one mixed prefill step, run before
    # the engine has touched the cache, so the pages written here are free and hold no cached prefix ...
    questions = (PARITY_PROMPTS * args.num_prompts)[:args.num_prompts]
    prompts = [llm.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    ref_model = _hf_eager(model)
    nxt, chunks = 0, []
    for p in prompts:
        n_pages = -(-len(p) // cm.page_size)
        chunks.append(SequenceChunk(p, 0, list(range(nxt, nxt + n_pages))))
        nxt += n_pages
    batch = cm.pack(chunks, all_logits=True)
    logits = cm.forward(batch)
    worst = 0.0
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = ref_model(torch.tensor([p], device=cm.device)).logits[0].float()
            rows = [r for r, s in enumerate(batch.logits_rows) if s == i]
            worst = max(worst, rel_rms(logits[rows].float(), ref))

    # a real answer
    greedy = SamplingConfig(max_new_tokens=args.max_new_tokens)
    answer = llm.chat([{"role": "user", "content": args.question}], greedy)[0]
    console.print(f"\nQ: {args.question}", markup=False, highlight=False)
    console.print("A: " + answer.text.strip() + "\n", markup=False, highlight=False)

    tol = 1e-4 if cm.dtype == torch.float32 else 2e-2
    console.print(f"logits vs HF eager: max relative RMS {worst:.2e} (tolerance {tol:g}) "
                  + ("[green]OK[/green]" if worst < tol else "[red]MISMATCH[/red]"))

    # ... and greedy tokens against HF generate (EOS ignored on both sides, so every token is compared)
    fixed = SamplingConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    outs = llm.generate(prompts, fixed)
    saved_eos = ref_model.generation_config.eos_token_id
    ref_model.generation_config.eos_token_id = None
    agree = same = 0
    try:
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p], device=cm.device)  # explicit mask: HF would mask prompt tokens == pad id
            ref = ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            n = next((i for i, (a, b) in enumerate(zip(ref, o.output_ids)) if a != b), len(ref))
            agree += n
            same += int(ref == o.output_ids)
    finally:
        ref_model.generation_config.eos_token_id = saved_eos
    total = args.max_new_tokens * len(prompts)
    console.print(f"greedy tokens identical to HF generate: {same}/{len(prompts)} prompts "
                  f"({agree}/{total} tokens before the first difference)")

    # 3. speed: all prompts together through the in-flight batching engine
    llm.engine.record_stats = True
    llm.engine.stats.steps.clear()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, fixed)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.output_ids) for o in outs)
    host = sorted(s.host_overhead for s in llm.engine.stats.steps) or [float("nan")]
    table = Table(title="generation")
    for col in ("prompts", "new tokens", "seconds", "tokens/s", "host overhead/step (median)"):
        table.add_column(col)
    table.add_row(str(len(prompts)), str(n_out), f"{dt:.2f}", f"{n_out / dt:.1f}",
                  f"{host[len(host) // 2] * 1e3:.2f} ms")
    console.print(table)
    console.print(cm.explain(), markup=False, highlight=False)
    console.print(f"demo wall time {time.perf_counter() - t_start:.1f} s")
    ok = worst < tol and (same == len(prompts) or cm.dtype != torch.float32)
    return 0 if ok else 1
