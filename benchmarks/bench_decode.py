"""GPU serving benchmark for one builtin config: decode tok/s per batch size against the memory-bandwidth floor,
prefill tok/s, a continuous-batching workload, compile time, and a per-step time breakdown from the profiler.

    python benchmarks/bench_decode.py --model llama-3.2-1b --lowering cudagraph --json out.json

Floor: every decode step reads all weight bytes plus the KV bytes of every sequence; divided by the device
bandwidth measured in the same run (a large device-to-device copy), that is the fastest a step can be.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def record_jit_compiles() -> list:
    """From now on, every Triton kernel variant this process compiles (or loads from Triton's disk cache) as
    (seconds from now, kernel name, its specialisation): first-use compiles inside a timed workload show up by name."""
    events: list = []
    try:
        from triton import knobs
    except ImportError:  # older triton: nothing recorded
        return events
    t0 = time.perf_counter()
    prev = knobs.runtime.jit_post_compile_hook

    def hook(**kw):
        events.append((time.perf_counter() - t0, getattr(kw.get("fn"), "name", "?"), kw.get("repr", "")))
        return prev(**kw) if prev else None

    knobs.runtime.jit_post_compile_hook = hook
    return events


def measure_bandwidth() -> float:
    """Bytes/s of a large D2D copy (read + write counted); same method as the attention microbenchmark."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_triton_attention import copy_bandwidth

    return copy_bandwidth(1 << 30, reps=10) * 1e9


def kv_bytes_per_token(cm) -> int:
    """KV bytes one token costs over all layers, as the backend lays the cache out (fp8 pages and scales too)."""
    return sum(cm.backend.bytes_per_token(s, cm.dtype) for s in cm.ctx.attention_specs)


def run_prefills(engine) -> None:
    """Step ``engine`` until every request has been admitted and has its whole prompt in the cache."""
    while engine.scheduler.waiting or any(s.num_computed < s.prompt_len for r in engine.scheduler.running
                                          for s in r.seqs):
        engine.step()


def decode_chunks(cm, batch: int, ctx: int) -> list:
    """``batch`` one-token decodes at context ``ctx``, each on its own pages."""
    from autodeploy.metadata import SequenceChunk

    pages_per = -(-(ctx + 1) // cm.page_size)
    return [SequenceChunk([1], ctx, list(range(i * pages_per, (i + 1) * pages_per))) for i in range(batch)]


class _NoopProcessor:
    """A Python logits processor that changes nothing: forces the host-assisted sampler path (synchronous steps)
    so its cost can be measured against the fused path."""

    def __call__(self, token_ids, logits):
        return logits


def decode_run(cm, batch: int, ctx: int, steps: int, vocab: int, async_scheduling: bool = True,
               sampling: dict | None = None, noop_processor: bool = False):
    """Prefill ``batch`` sequences of ``ctx`` tokens, then time ``steps`` engine decode steps (all decoding).
    ``sampling``: SamplingConfig fields of every request (None: greedy; sampled requests are seeded 0, 1, ...).

    Returns (median step s, mean step s, slowest step s, median host overhead s, median forward s). Each step is
    timed on its own: with asynchronous scheduling a steady-state step's wall time is the GPU step time, and the
    median keeps a rare stall (a GC pause, a late JIT) from being averaged into the result; the mean and the
    slowest step are reported beside it so such stalls stay visible."""
    from autodeploy.runtime.engine import Engine
    from autodeploy.runtime.sampling import SamplingConfig

    engine = Engine(cm, record_stats=True, async_scheduling=async_scheduling)
    g = torch.Generator().manual_seed(batch)
    sampling = dict(sampling or {})
    extra = {"logits_processors": [_NoopProcessor()]} if noop_processor else {}
    # Sequences admitted first decode while later prompts prefill: room for those tokens too, so that none
    # finishes before or during the timed steps (the batch would shrink under the measurement).
    max_new = max(steps + 8, cm.max_seq_len - ctx - 1)
    for i in range(batch):
        seed = {"seed": i} if sampling.get("temperature", 0) > 0 else {}
        engine.add_request(torch.randint(0, vocab, (ctx,), generator=g).tolist(),
                           SamplingConfig(max_new_tokens=max_new, ignore_eos=True, **sampling, **seed, **extra))
    run_prefills(engine)
    running = sum(len(r.seqs) for r in engine.scheduler.running)
    if running != batch or engine.stats.num_preemptions:
        raise RuntimeError(f"only {running} of {batch} sequences are decoding ({engine.stats.num_preemptions} "
                           f"preemptions; KV cache of {cm.num_pages} pages)")
    for _ in range(3):
        engine.step()  # warm-up (captures the bucket's graph)
    torch.cuda.synchronize()
    engine.stats.steps.clear()
    times = []
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    running = sum(len(r.seqs) for r in engine.scheduler.running)
    if engine.stats.num_preemptions or running != batch:
        raise RuntimeError(f"{engine.stats.num_preemptions} preemptions, {running} of {batch} sequences still "
                           "decoding after the timed steps")
    st = engine.stats.steps
    for r in list(engine.scheduler.running):
        engine.scheduler.finish(r)
    return (statistics.median(times), dt / steps, max(times), statistics.median(s.host_overhead for s in st),
            statistics.median(s.forward for s in st))


def profile_breakdown(cm, batch: int, ctx: int, vocab: int) -> dict:
    """Per-step GPU time by category from the torch profiler, over eager steps (so kernels are attributable) of
    what an engine step launches: the input upload, the forward and the greedy pick. Host overhead per step is
    the decode table's own column (wall time the GPU does not see)."""
    from torch.profiler import ProfilerActivity, profile

    from autodeploy.backends.triton.kernels.argmax import argmax_rows

    chunks = decode_chunks(cm, batch, ctx)
    host = torch.empty(batch, dtype=torch.int64, pin_memory=True)

    def step():
        argmax_rows(cm.forward(cm.packer.pack(chunks)), host_out=host)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = 5
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    cats = {"attention": 0.0, "gemm": 0.0, "norm_act": 0.0, "metadata": 0.0, "sampling": 0.0, "other": 0.0}
    kernels = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0))
        if t <= 0 or evt.key.startswith("autodeploy::") or evt.key.startswith("aten::"):
            continue
        kernels.append((t / n, evt.count // n, evt.key[:60]))
        name = evt.key.lower()
        if "argmax" in name:
            cats["sampling"] += t
        elif any(k in name for k in ("partition", "upload", "memcpy", "searchsorted")):
            cats["metadata"] += t  # step inputs and the one metadata node's derivation
        elif "attn" in name or "decode" in name or "rope_cache" in name:
            cats["attention"] += t
        elif any(k in name for k in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90", "matmul", "splitk")):
            cats["gemm"] += t
        elif "rms" in name or "norm" in name or "gated_act" in name:
            cats["norm_act"] += t
        else:
            cats["other"] += t  # embedding and RoPE-table gathers, casts
    out = {k: v / n / 1e3 for k, v in cats.items()}  # ms per step
    # the heaviest kernels: (us per step, launches per step, name)
    out["top_kernels"] = [f"{t:.0f}us x{c} {name}" for t, c, name in sorted(kernels, reverse=True)[:10]]
    return out


def time_forward(cm, batch, reps: int = 5, warmup: int = 2) -> float:
    """Mean wall seconds of ``cm.forward(batch)`` (uncaptured unless the batch is a graph bucket)."""
    for _ in range(warmup):
        cm.forward(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        cm.forward(batch)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def mixed_chunks(cm, n_decode: int, prefill_len: int, ctx: int, vocab: int) -> list:
    """One ``prefill_len``-token prompt followed by ``n_decode`` one-token decodes at context ``ctx``."""
    from autodeploy.metadata import SequenceChunk

    pages_per = -(-(max(ctx + 1, prefill_len)) // cm.page_size)
    g = torch.Generator().manual_seed(3)
    chunks = [SequenceChunk(torch.randint(0, vocab, (prefill_len,), generator=g).tolist(), 0,
                            list(range(pages_per)))]
    return chunks + [SequenceChunk([1], ctx, list(range((i + 1) * pages_per, (i + 2) * pages_per)))
                     for i in range(n_decode)]


def gpu_busy_ms(cm, batch) -> float:
    """The GPU's busy time in one ``cm.forward(batch)``: the sum of kernel times from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        cm.forward(batch)
        torch.cuda.synchronize()
    return sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()
               if not e.key.startswith(("autodeploy::", "aten::"))) / 1e3


def mixed_step(cm, n_decode: int, prefill_len: int, ctx: int, vocab: int) -> dict:
    """One step of ``n_decode`` decodes (context ``ctx``) plus one ``prefill_len``-token prefill: wall time vs
    the GPU's busy time. wall >> busy means host-bound."""
    batch = cm.packer.pack(mixed_chunks(cm, n_decode, prefill_len, ctx, vocab))
    wall = time_forward(cm, batch)
    return {"decodes": n_decode, "prefill_len": prefill_len, "wall_ms": wall * 1e3,
            "gpu_busy_ms": gpu_busy_ms(cm, batch)}


def prefill_and_profile(cm, args, res: dict, batches: list[int], vocab: int) -> None:
    """Prefill throughput, mixed prefill+decode steps and the per-step profile breakdown, into ``res``."""
    # prefill throughput: 8 prompts of prefill_len tokens in one step
    from autodeploy.metadata import SequenceChunk

    n_pre = max(1, 8192 // args.prefill_len)
    pages_per = -(-args.prefill_len // cm.page_size)
    g = torch.Generator().manual_seed(0)
    chunks = [SequenceChunk(torch.randint(0, vocab, (args.prefill_len,), generator=g).tolist(), 0,
                            list(range(i * pages_per, (i + 1) * pages_per))) for i in range(n_pre)]
    pre = time_forward(cm, cm.pack(chunks))
    res["prefill"] = {"tokens": n_pre * args.prefill_len, "step_ms": pre * 1e3,
                      "tok_per_s": n_pre * args.prefill_len / pre}
    print(f"prefill {n_pre}x{args.prefill_len}: {pre * 1e3:.1f} ms, {n_pre * args.prefill_len / pre:,.0f} tok/s")

    res["mixed_steps"] = [mixed_step(cm, nd, pl, args.ctx, vocab) for nd, pl in ((64, 512), (256, 512), (0, 2048))
                          if nd <= cm.max_batch_size - 1]
    for row in res["mixed_steps"]:
        print(f"mixed step {row['decodes']} decodes + {row['prefill_len']}-token prefill: wall {row['wall_ms']:.2f} ms,"
              f" GPU busy {row['gpu_busy_ms']:.2f} ms")
    res["breakdown_ms_per_step"] = {str(b): profile_breakdown(cm, b, args.ctx, vocab) for b in (1, batches[-1])}
    print("per-step GPU time by category (eager step, ms):", json.dumps(res["breakdown_ms_per_step"]))


def _torch_argmax(x, host_out=None):
    """The greedy pick before the chunked kernels: torch.argmax, then a copy-engine trip to the host."""
    tokens = x.argmax(dim=-1)
    if host_out is not None:
        host_out.copy_(tokens, non_blocking=True)
    return tokens


def _patch(module: str, name: str, value) -> None:
    import importlib

    setattr(importlib.import_module(module), name, value)


def _drop_backend_pass(name: str) -> None:
    from autodeploy.backends.triton import TritonBackend

    passes = TritonBackend.graph_passes
    TritonBackend.graph_passes = lambda self: [f for f in passes(self) if f.pass_name != name]


def _drop_pass(name: str) -> None:
    from autodeploy.compiler.pipeline import DEFAULT_PASSES

    DEFAULT_PASSES[:] = [n for n in DEFAULT_PASSES if n != name]


# Switches that put back an earlier path, for side-by-side runs: flag -> (help, what it does).
TUNING_SWITCHES = {
    "torch-partition": ("derive the decode partition with torch ops instead of its one-kernel version",
                        lambda: _patch("autodeploy.backends.triton.partition", "PARTITION_KERNEL", False)),
    "torch-argmax": ("greedy picks with torch.argmax instead of the chunked argmax kernels",
                     lambda: _patch("autodeploy.runtime.engine", "argmax_rows", _torch_argmax)),
    "copy-engine-upload": ("upload step inputs with cudaMemcpyAsync instead of the upload kernel",
                           lambda: _patch("autodeploy.metadata.upload", "KERNEL_MAX_BYTES", -1)),
    "no-gated-gemv": ("keep the gated activation as its own kernel after the batch-1 gate/up GEMM",
                      lambda: _drop_backend_pass("fuse_gemv_gated_act")),
    "no-rope-table": ("compute RoPE cos/sin in the graph instead of gathering them from a table",
                      lambda: _drop_pass("tabulate_rope")),
}


def add_tuning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gemv-min-n", type=int, default=None,
                   help="tuning: batch-1 linears with at least this many outputs use the skinny GEMM")
    p.add_argument("--gemv-pdl-mode", type=int, default=None, help="tuning: the skinny GEMM's PDL mode (1-3)")
    p.add_argument("--gemv-config", default=None,
                   help="tuning: the skinny GEMM's BLOCK_N,BLOCK_K,warps,stages for every shape")
    for flag, (text, _) in TUNING_SWITCHES.items():
        p.add_argument(f"--{flag}", action="store_true", help=f"tuning: {text}")


def apply_tuning(args: argparse.Namespace) -> None:
    from autodeploy.backends.triton.kernels import gemv

    if args.gemv_min_n is not None:
        gemv.GEMV_MIN_N = args.gemv_min_n
    if args.gemv_pdl_mode is not None:
        gemv.PDL_MODE = args.gemv_pdl_mode
    if args.gemv_config:
        cfg = tuple(int(v) for v in args.gemv_config.split(","))
        gemv.gemv_config = lambda k, m=1: cfg
    for flag, (_, switch) in TUNING_SWITCHES.items():
        if getattr(args, flag.replace("-", "_")):
            switch()


def _pipeline(args):
    """The default pipeline, plus the skinny quantized GEMM after quantization when asked for."""
    if not args.quant_skinny:
        return None
    import autodeploy.backends.triton.passes.quant_skinny_gemm  # noqa: F401 - registers the pass
    from autodeploy.compiler.pipeline import Pipeline

    return Pipeline.default().insert_after("quantize_linears", "quant_skinny_gemm")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--lowering", default="cudagraph")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--ctx", type=int, default=512, help="context length of each decoding sequence")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--cb-requests", type=int, default=0, help="continuous-batching workload size (0: skip)")
    p.add_argument("--cb-repeats", type=int, default=1, help="run the workload this many times, report the last")
    p.add_argument("--cb-input", default="128:1024", help="continuous batching: prompt lengths (N or LO:HI)")
    p.add_argument("--cb-output", default="128", help="continuous batching: output lengths (N or LO:HI)")
    p.add_argument("--cb-only", action="store_true", help="run only the continuous-batching workload")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="token budget of one engine step")
    p.add_argument("--admit-min-tokens", type=int, default=None, help="AdmissionPolicy.min_tokens (0: greedy)")
    p.add_argument("--admit-max-wait", type=int, default=None, help="AdmissionPolicy.max_wait_steps")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--max-batch-size", type=int, default=0, help="default: the largest --batches entry (>= 64)")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="continuous batching: leave the start-up objects to the garbage collector (Engine freeze_gc)")
    p.add_argument("--json", default=None)
    p.add_argument("--decode-only", action="store_true", help="skip prefill, mixed steps and the profile")
    p.add_argument("--quantization", default=None, choices=["fp8", "int8", "int8-weight"],
                   help="quantize the linears (compile(quantization=...))")
    p.add_argument("--quant-skinny", action="store_true",
                   help="with --quantization: also name quant_skinny_gemm in the pipeline (the triton backend runs it by default)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="KV-cache storage (fp8: E4M3 pages with per-row scales)")
    p.add_argument("--page-size", type=int, default=None, help="KV-cache page size (compile(page_size=...))")
    add_tuning_args(p)
    from autodeploy.entrypoints.bench import add_sampling_arguments, sampling_settings

    add_sampling_arguments(p)  # --temperature/--top-k/--top-p/--min-p for the decode rows and the workload
    p.add_argument("--noop-processor", action="store_true",
                   help="decode rows: attach a no-op Python logits processor (measures the host-sampler path)")
    p.add_argument("--sync-too", action="store_true",
                   help="also time each decode row with asynchronous scheduling off (side by side)")
    args = p.parse_args()

    import autodeploy
    from autodeploy.graph.utils import held_bytes
    from autodeploy.models.builtin import build_builtin

    apply_tuning(args)
    sampling = sampling_settings(args)
    bw = measure_bandwidth()
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    model = build_builtin(args.model, dtype=torch.bfloat16, device="cuda")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cm = autodeploy.compile(model, max_batch_size=args.max_batch_size or max(batches + [64]),
                            max_seq_len=args.max_seq_len,
                            backend=args.backend, lowering=args.lowering, max_num_tokens=args.max_num_tokens,
                            kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                            passes=_pipeline(args), page_size=args.page_size)
    compile_s = time.perf_counter() - t0
    weight_bytes = held_bytes(cm.graph_module)  # as compiled: quantized linears count their 8-bit bytes
    kv_tok = kv_bytes_per_token(cm)
    vocab = cm.vocab_size
    res = {"model": args.model, "lowering": cm.report.lowering, "backend": cm.report.backend,
           "kv_cache_dtype": args.kv_cache_dtype, "kv_bytes_per_token": kv_tok,
           "quantization": args.quantization, "quant_skinny": args.quant_skinny,
           "device_bw_GBps": bw / 1e9, "weight_GB": weight_bytes / 1e9, "compile_s": compile_s,
           "model_init_s": build_s, "sampling": sampling, "noop_processor": args.noop_processor, "decode": []}
    print(f"device copy bandwidth {bw / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; compile {compile_s:.1f} s")
    print("sampling:", "greedy" if sampling["temperature"] == 0 else json.dumps(sampling),
          "(+ no-op Python logits processor)" if args.noop_processor else "")
    print(f"{'batch':>5} {'ctx':>5} {'sched':>5} {'step ms':>8} {'tok/s':>9} {'floor ms':>8} {'% floor':>7} "
          f"{'host ms':>7} {'mean ms':>8} {'max ms':>8}")
    for b in [] if args.cb_only else batches:
        for mode in (True, False) if args.sync_too else (True,):
            step, mean, worst, host, fwd = decode_run(cm, b, args.ctx, args.steps, vocab, async_scheduling=mode,
                                                      sampling=sampling, noop_processor=args.noop_processor)
            floor = (weight_bytes + b * (args.ctx + args.steps // 2) * kv_tok) / bw
            row = {"batch": b, "ctx": args.ctx, "async": mode, "step_ms": step * 1e3, "tok_per_s": b / step,
                   "floor_ms": floor * 1e3, "pct_of_floor": 100 * floor / step, "host_overhead_ms": host * 1e3,
                   "forward_ms": fwd * 1e3, "mean_step_ms": mean * 1e3, "max_step_ms": worst * 1e3,
                   "sampling": sampling}
            res["decode"].append(row)
            print(f"{b:>5} {args.ctx:>5} {'async' if mode else 'sync':>5} {step * 1e3:8.2f} {b / step:9.1f} "
                  f"{floor * 1e3:8.2f} {100 * floor / step:6.1f}% {host * 1e3:7.3f} {mean * 1e3:8.2f} {worst * 1e3:8.2f}")

    if not args.cb_only and not args.decode_only:
        prefill_and_profile(cm, args, res, batches, vocab)
    if args.cb_requests and not args.decode_only:
        from autodeploy.entrypoints.bench import admission_policy, make_workload, run_workload
        from autodeploy.runtime.engine import Engine

        wl = make_workload(args.cb_requests, args.cb_input, args.cb_output, float("inf"), vocab, 0)
        jit = record_jit_compiles()
        policy = admission_policy(args.admit_min_tokens, args.admit_max_wait)
        freeze = not args.no_gc_freeze  # one model for the process's lifetime, as a server
        for rep in range(args.cb_repeats - 1):  # earlier passes absorb one-time costs (JIT, graph captures)
            first = run_workload(Engine(cm, max_num_tokens=args.max_num_tokens, admission=policy, freeze_gc=freeze), wl,
                                 progress=False, sampling=sampling)
            print(f"continuous batching pass {rep + 1}: {first['output_tok_per_s']:,.0f} output tok/s "
                  f"({first['elapsed_s']:.1f} s); by step kind: {json.dumps(first['step_kinds'])}")
        cb = run_workload(Engine(cm, max_num_tokens=args.max_num_tokens, admission=policy, freeze_gc=freeze), wl,
                          progress=False, sampling=sampling)
        res["continuous_batching"] = {k: cb[k] for k in ("output_tok_per_s", "total_tok_per_s", "elapsed_s",
                                                          "ttft_s", "tpot_s", "steps", "preemptions",
                                                          "max_running_seqs", "host_overhead_per_step_s",
                                                          "admission_held_steps", "step_kinds", "gc_pauses",
                                                          "gc_frozen")}
        print(f"continuous batching {args.cb_requests} req (in {args.cb_input}, out {args.cb_output}, max batch "
              f"{cm.max_batch_size}, {args.max_num_tokens} tokens/step, {policy}): "
              f"{cb['output_tok_per_s']:,.0f} output tok/s "
              f"({cb['elapsed_s']:.1f} s, max running {cb['max_running_seqs']}, preemptions {cb['preemptions']}, "
              f"admission held {cb['admission_held_steps']} steps; TTFT p50/p90 {cb['ttft_s']['p50']:.2f}/"
              f"{cb['ttft_s']['p90']:.2f} s)")
        print("  by step kind:", json.dumps(cb["step_kinds"]))
        print(f"  garbage collector (frozen at start: {cb['gc_frozen']}), pauses by generation:",
              json.dumps(cb["gc_pauses"]))
        print(f"  Triton kernel variants first used during the workload(s): {len(jit)}"
              + "".join(f"\n    {t:7.2f} s {name}: {spec[:400]}" for t, name, spec in jit[:20]))
        res["continuous_batching"]["jit_compiles"] = jit
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    main()
