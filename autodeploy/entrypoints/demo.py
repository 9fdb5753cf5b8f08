"""The README's main job: compile the built-in Llama, verify it against HF, generate, and report."""

from __future__ import annotations

import argparse
import time

import torch

from autodeploy.numerics import rel_rms


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from autodeploy.entrypoints.common import compile_from_args as _compile
    from autodeploy.metadata import SequenceChunk
    from autodeploy.runtime.engine import Engine
    from autodeploy.runtime.sampling import SamplingConfig

    console = Console()
    with console.status("exporting and compiling the built-in model..."):
        t0 = time.perf_counter()
        model, cm = _compile(args)
        compile_s = time.perf_counter() - t0
    console.print(f"compiled in {compile_s:.2f} s")

    g = torch.Generator().manual_seed(0)
    vocab = cm.vocab_size
    lens = [8 + 5 * i for i in range(args.num_prompts)]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]

    # 1. logits check against HF eager on the same weights (every prompt in one mixed prefill step)
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
            ref = model(torch.tensor([p], device=cm.device)).logits[0].float()
            rows = [r for r, s in enumerate(batch.logits_rows) if s == i]
            worst = max(worst, rel_rms(logits[rows].float(), ref))
    tol = 1e-4 if cm.dtype == torch.float32 else 2e-2
    console.print(f"logits vs HF eager: max relative RMS {worst:.2e} (tolerance {tol:g}) "
                  + ("[green]OK[/green]" if worst < tol else "[red]MISMATCH[/red]"))

    # 2. greedy tokens against HF generate
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    outs = Engine(cm).generate(prompts, sampling)
    model.generation_config.eos_token_id = None
    same = 0
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p], device=cm.device), max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        same += int(ref == o.output_ids)
    console.print(f"greedy tokens identical to HF generate: {same}/{len(prompts)} prompts")

    # 3. speed
    engine = Engine(cm, record_stats=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sampling)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.output_ids) for o in outs)
    host = sorted(s.host_overhead for s in engine.stats.steps)
    table = Table(title="generation")
    for col in ("prompts", "new tokens", "seconds", "tokens/s", "host overhead/step (median)"):
        table.add_column(col)
    table.add_row(str(len(prompts)), str(n_out), f"{dt:.2f}", f"{n_out / dt:.1f}", f"{host[len(host) // 2] * 1e3:.2f} ms")
    console.print(table)
    console.print(f"first prompt's tokens: {outs[0].output_ids[:16]}...", markup=False)
    console.print(cm.explain(), markup=False, highlight=False)
    ok = worst < tol and (same == len(prompts) or cm.dtype != torch.float32)
    return 0 if ok else 1
