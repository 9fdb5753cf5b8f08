"""``autodeploy bench``: a synthetic serving workload through the real engine.

Requests with uniform random input/output lengths arrive as a Poisson process (or all at once); the engine
runs in-flight batching. Every request samples with ``--temperature/--top-k/--top-p/--min-p`` (default: greedy),
each with its own seed, and the JSON records the setting under ``sampling``. Reports throughput, TTFT/TPOT percentiles and the host-side overhead per step
(scheduling, nest_sequences, sampling, bookkeeping) as a table on stdout; ``--json FILE`` writes the full
results there (``--json -``: to stdout, instead of the table).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import random
import statistics
import time
from typing import Any, Optional



def _range(spec: str) -> tuple[int, int]:
    lo, _, hi = spec.partition(":")
    return int(lo), int(hi or lo)


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not xs:
        return {f"p{p}": float("nan") for p in ps}
    xs = sorted(xs)
    return {f"p{p}": xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] for p in ps}


@contextlib.contextmanager
def gc_pauses():
    """Record the garbage collector's pauses while the block runs: yields ``{generation: {count, total_s,
    max_s}}``, filled when the block ends (a full collection over a large heap stalls a serving step)."""
    starts: list[float] = []
    pauses: list[tuple[int, float]] = []

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            starts.append(time.perf_counter())
        elif starts:
            pauses.append((info["generation"], time.perf_counter() - starts.pop()))

    out: dict[int, dict[str, float]] = {}
    gc.callbacks.append(watch)
    try:
        yield out
    finally:
        gc.callbacks.remove(watch)
        by_gen = collections.defaultdict(list)
        for gen, dt in pauses:
            by_gen[gen].append(dt)
        out.update({gen: {"count": len(v), "total_s": sum(v), "max_s": max(v)} for gen, v in sorted(by_gen.items())})


def make_workload(num: int, input_len: str, output_len: str, rate: float, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = _range(input_len), _range(output_len)
    t, out = 0.0, []
    for _ in range(num):
        if rate != float("inf"):
            t += rng.expovariate(rate)
        out.append({"arrival": t, "prompt": [rng.randrange(vocab) for _ in range(rng.randint(ilo, ihi))],
                    "max_new_tokens": rng.randint(olo, ohi)})
    return out


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The workload's sampling fields from ``--temperature/--top-k/--top-p/--min-p``, checked now (a bad value
    raises SamplingConfigError naming the field, before anything is compiled)."""
    from autodeploy.runtime.sampling import SamplingConfig

    out = {"temperature": float(args.temperature), "top_k": int(args.top_k), "top_p": float(args.top_p),
           "min_p": float(args.min_p)}
    SamplingConfig(**out)
    return out


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p (nucleus) filter (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0: off)")


def run_workload(engine: Any, workload: list[dict], progress: bool = True,
                 sampling: Optional[dict[str, Any]] = None) -> dict:
    """Run ``workload`` through ``engine``; ``sampling``: SamplingConfig fields for every request (None:
    greedy); sampled requests get the seeds 0, 1, ... in arrival order."""
    from tqdm import tqdm

    from autodeploy.runtime.sampling import SamplingConfig

    sampling = dict(sampling or {})
    sampled = sampling.get("temperature", 0.0) > 0

    engine.record_stats = True
    pending = list(workload)
    reqs = []
    bar = tqdm(total=len(workload), desc="requests", disable=not progress, unit="req")
    with gc_pauses() as gc_stats:
        t0 = time.perf_counter()
        done = 0
        while pending or engine.has_work():
            now = time.perf_counter() - t0
            while pending and pending[0]["arrival"] <= now:
                w = pending.pop(0)
                seed = {"seed": len(reqs)} if sampled else {}
                req = engine.add_request(w["prompt"], SamplingConfig(max_new_tokens=w["max_new_tokens"],
                                                                     ignore_eos=True, **sampling, **seed))
                req.metrics.arrival = t0 + w["arrival"]
                reqs.append(req)
            if not engine.has_work():
                time.sleep(min(0.01, max(0.0, pending[0]["arrival"] - now)))
                continue
            engine.step()
            finished = sum(1 for r in reqs if r.finished)
            bar.update(finished - done)
            done = finished
        elapsed = time.perf_counter() - t0
    bar.close()
    steps = engine.stats.steps
    out_tokens = sum(r.metrics.num_generated for r in reqs)
    in_tokens = sum(r.metrics.num_prompt_tokens for r in reqs)
    max_running = max((s.num_seqs for s in steps), default=0)
    busy = [s.host_overhead for s in steps if s.num_seqs >= max(1, int(0.9 * max_running))]
    busy_decode = [s.host_overhead for s in steps
                   if s.num_seqs >= max(1, int(0.9 * max_running)) and s.num_tokens == s.num_seqs]
    return {
        "requests": len(reqs), "errors": sum(1 for r in reqs if r.error), "elapsed_s": elapsed,
        "sampling": sampling or {"temperature": 0.0},
        "output_tokens": out_tokens, "input_tokens": in_tokens,
        "output_tok_per_s": out_tokens / elapsed, "total_tok_per_s": (in_tokens + out_tokens) / elapsed,
        "ttft_s": percentiles([r.metrics.ttft for r in reqs if r.metrics.ttft is not None]),
        "tpot_s": percentiles([r.metrics.tpot for r in reqs if r.metrics.tpot is not None]),
        "steps": len(steps), "preemptions": engine.stats.num_preemptions, "max_running_seqs": max_running,
        "admission_held_steps": engine.scheduler.total_held_steps,
        "host_overhead_per_step_s": {
            **percentiles([s.host_overhead for s in steps]),
            "at_max_batch_median": statistics.median(busy) if busy else float("nan"),
            "decode_only_at_max_batch_median": statistics.median(busy_decode) if busy_decode else float("nan"),
            "schedule_median": statistics.median(s.schedule for s in steps) if steps else float("nan"),
            "pack_median": statistics.median(s.pack for s in steps) if steps else float("nan"),
            "sample_median": statistics.median(s.sample for s in steps) if steps else float("nan"),
            "bookkeeping_median": statistics.median(s.bookkeeping for s in steps) if steps else float("nan"),
        },
        "forward_median_s": statistics.median(s.forward for s in steps) if steps else float("nan"),
        "step_kinds": step_kinds(steps),
        "gc_pauses": gc_stats, "gc_frozen": getattr(engine, "gc_frozen", False),
    }


_PHASES = ("schedule", "pack", "forward", "sample", "bookkeeping")


def step_kinds(steps: list) -> dict[str, dict[str, float]]:
    """Where the time went, by step kind: decode-only steps vs steps that carry prefill tokens (count, wall
    seconds, tokens, median step time, each phase's median, and the slowest steps split by engine phase)."""
    out = {}
    for kind, pick in (("decode", lambda s: s.num_tokens == s.num_seqs), ("prefill_or_mixed",
                                                                            lambda s: s.num_tokens != s.num_seqs)):
        sel = [s for s in steps if pick(s)]
        wall = [s.host_overhead + s.forward for s in sel]
        out[kind] = {"steps": len(sel), "wall_s": sum(wall), "tokens": sum(s.num_tokens for s in sel),
                     "seqs_median": statistics.median(s.num_seqs for s in sel) if sel else 0,
                     "step_median_ms": 1e3 * statistics.median(wall) if wall else float("nan"),
                     # forward includes the wait for the GPU: host-bound steps show a short forward here
                     "phase_median_ms": {ph: round(1e3 * statistics.median(getattr(s, ph) for s in sel), 2)
                                         for ph in _PHASES} if sel else {},
                     # the slowest steps: one-time costs (JIT, graph capture) show here
                     "slowest": [{"ms": round(1e3 * w, 1), "seqs": s.num_seqs, "tokens": s.num_tokens,
                                  **{f"{ph}_ms": round(1e3 * getattr(s, ph), 2) for ph in _PHASES}}
                                 for w, s in sorted(zip(wall, sel), key=lambda p: -p[0])[:4]]}
    return out


def render(results: dict, console: Any) -> None:
    from rich.table import Table

    t = Table(title="autodeploy bench")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests (errors)", f"{results['requests']} ({results['errors']})")
    t.add_row("sampling", ", ".join(f"{k}={v}" for k, v in results.get("sampling", {}).items()) or "greedy")
    t.add_row("elapsed", f"{results['elapsed_s']:.2f} s")
    t.add_row("output tokens/s", f"{results['output_tok_per_s']:.1f}")
    t.add_row("total tokens/s", f"{results['total_tok_per_s']:.1f}")
    for name in ("ttft_s", "tpot_s"):
        t.add_row(name.replace("_s", " p50/p90/p99"), " / ".join(f"{v * 1e3:.2f}" for v in results[name].values())
                  + " ms")
    h = results["host_overhead_per_step_s"]
    t.add_row("host overhead/step p50/p90/p99", f"{h['p50'] * 1e3:.3f} / {h['p90'] * 1e3:.3f} / {h['p99'] * 1e3:.3f} ms")
    t.add_row(f"host overhead/step at {results['max_running_seqs']} running", f"{h['at_max_batch_median'] * 1e3:.3f} ms")
    t.add_row(f"  decode-only steps at {results['max_running_seqs']} running",
              f"{h['decode_only_at_max_batch_median'] * 1e3:.3f} ms")
    t.add_row("  schedule / pack / sample / bookkeeping", " / ".join(
        f"{h[k] * 1e3:.3f}" for k in ("schedule_median", "pack_median", "sample_median", "bookkeeping_median")) + " ms")
    t.add_row("forward median", f"{results['forward_median_s'] * 1e3:.2f} ms")
    t.add_row("steps / preemptions / admission held", f"{results['steps']} / {results['preemptions']} / "
              f"{results['admission_held_steps']}")
    for kind, k in results["step_kinds"].items():
        t.add_row(f"  {kind} steps", f"{k['steps']} steps, {k['wall_s']:.2f} s, {k['tokens']} tokens, "
                  f"median {k['step_median_ms']:.2f} ms")
    console.print(t)


def admission_policy(min_tokens: Optional[int], max_wait: Optional[int]):
    """An AdmissionPolicy with the given overrides (None keeps the default)."""
    from autodeploy.runtime.scheduler import AdmissionPolicy

    given = {"min_tokens": min_tokens, "max_wait_steps": max_wait}
    return AdmissionPolicy(**{k: v for k, v in given.items() if v is not None})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=128, help="requests in the workload")
    p.add_argument("--input-len", default="16:64", help="prompt tokens: MIN:MAX uniform, or N")
    p.add_argument("--output-len", default="16:64", help="generated tokens: MIN:MAX uniform, or N")
    p.add_argument("--arrival-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-num-tokens", type=int, default=None, help="token budget per step")
    p.add_argument("--admit-min-tokens", type=int, default=None,
                   help="while the batch is nearly full, admit waiting requests only when this many prompt "
                        "tokens can start together (0: admit each request as soon as it fits; default: "
                        "AdmissionPolicy's)")
    p.add_argument("--admit-max-wait", type=int, default=None,
                   help="...but never hold admission longer than this many steps (default: AdmissionPolicy's)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    add_sampling_arguments(p)
    p.add_argument("--json", default=None, metavar="FILE", help="write the full results as JSON here ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console

    from autodeploy.entrypoints.common import compile_from_args as _compile
    from autodeploy.runtime.engine import Engine

    import os

    from autodeploy.errors import ConfigError

    to_stdout = args.json == "-"
    if args.json and not to_stdout and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        raise ConfigError(f"--json {args.json}: its directory does not exist or is not writable")
    console = Console(stderr=to_stdout)
    admission = admission_policy(args.admit_min_tokens, args.admit_max_wait)  # bad settings fail before compiling
    sampling = sampling_settings(args)
    t0 = time.perf_counter()
    extra = {"max_num_tokens": args.max_num_tokens} if args.max_num_tokens else {}
    _model, cm = _compile(args, **extra)
    compile_s = time.perf_counter() - t0
    workload = make_workload(args.num_requests, args.input_len, args.output_len, args.arrival_rate,
                             cm.vocab_size, args.seed)
    warm = Engine(cm)  # one warm-up pass so first-call costs (the sampling kernel's JIT too) are not billed
    from autodeploy.runtime.sampling import SamplingConfig

    warm.generate([workload[0]["prompt"]], SamplingConfig(**sampling, seed=0) if sampling["temperature"] > 0
                  else None)
    # this process serves one model to its end: its start-up objects leave the collector (a full collection
    # over them would stall a step; see Engine.freeze_startup_objects)
    results = run_workload(Engine(cm, admission=admission, freeze_gc=True), workload, progress=not args.no_progress,
                           sampling=sampling)
    results.update(compile_s=compile_s, model=args.model, device=str(cm.device), dtype=str(cm.dtype),
                   backend=cm.report.backend, lowering=cm.report.lowering,
                   workload=dict(num_requests=args.num_requests, input_len=args.input_len,
                                 output_len=args.output_len, arrival_rate=args.arrival_rate))
    render(results, console)
    if to_stdout:
        json.dump(results, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        console.print(f"results: {args.json}")
    return 0
