"""Command line: ``autodeploy demo | generate | bench``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from autodeploy.entrypoints.common import DTYPES, model_arg, resolve_cache_dir, resolve_dtype

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin", help="checkpoint dir, or builtin[:NAME] (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--backend", default="auto", help="attention backend or auto")
    p.add_argument("--lowering", default="auto",
                   help="auto (cudagraph on a GPU, else eager) | eager | torch-compile | cudagraph | "
                        "cudagraph-decode | torch-compile+cudagraph")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--cache-dir", default=None,
                   help="compile cache (default: $AUTODEPLOY_CACHE_DIR or ~/.cache/autodeploy); 'none' disables")
    p.add_argument("--log-json", action="store_true", help="log as JSON lines")
    p.add_argument("-v", "--verbose", action="store_true")


def cmd_demo(args: argparse.Namespace) -> int:
    """Compile the built-in model, check it against HF, generate, and report speed and the compile report."""
    from autodeploy.entrypoints.demo import run_demo

    return run_demo(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from autodeploy.entrypoints.llm import LLM
    from autodeploy.runtime.sampling import SamplingConfig

    model = model_arg(args.model, resolve_dtype(args), args.device)
    llm = LLM(model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, backend=args.backend,
              lowering=args.lowering, dtype=resolve_dtype(args), device=args.device, page_size=args.page_size,
              cache_dir=resolve_cache_dir(args))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    prompt: Any = args.prompt
    if llm.tokenizer is None:  # random-weight builtin: the prompt is a comma-separated list of token ids
        try:
            prompt = [int(t) for t in args.prompt.split(",")]
        except ValueError:
            print("this model has no tokenizer: pass --prompt as comma-separated token ids, e.g. 1,2,3",
                  file=sys.stderr)
            return 2
    for event in llm.generate_stream([prompt], sampling):
        if event.output is not None and event.output.error:
            print(f"error: {event.output.error}", file=sys.stderr)
            return 2
        piece = event.text if event.text is not None else f"{event.token_id} "
        sys.stdout.write(piece)
        sys.stdout.flush()
        if event.finished:
            m = event.output.metrics if event.output else None
            sys.stdout.write("\n")
            if m is not None:
                print(f"[{m.num_generated} tokens, ttft {m.ttft * 1e3:.1f} ms"
                      + (f", tpot {m.tpot * 1e3:.2f} ms" if m.tpot else "") + "]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from autodeploy.entrypoints.bench import run_bench

    return run_bench(args)


def main(argv: Optional[list[str]] = None) -> int:
    from autodeploy.logging_utils import configure_logging

    parser = argparse.ArgumentParser(prog="autodeploy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="compile the built-in model, verify against HF, generate, report")
    _common(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=4)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("generate", help="stream a completion")
    _common(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("bench", help="synthetic serving workload: throughput, TTFT/TPOT, host overhead")
    _common(p)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--input-len", default="16:64", help="MIN:MAX uniform, or N")
    p.add_argument("--output-len", default="16:64", help="MIN:MAX uniform, or N")
    p.add_argument("--arrival-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-num-tokens", type=int, default=None, help="token budget per step")
    p.add_argument("--admit-min-tokens", type=int, default=None,
                   help="while the batch is nearly full, admit waiting requests only when this many prompt tokens "
                        "can start together (0: admit each request as soon as it fits; default: AdmissionPolicy's)")
    p.add_argument("--admit-max-wait", type=int, default=None,
                   help="...but never hold admission longer than this many steps (default: AdmissionPolicy's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_bench)

    args = parser.parse_args(argv)
    configure_logging("INFO" if args.verbose else "WARNING", json_format=args.log_json or None)
    try:
        return args.fn(args)
    except Exception as exc:  # show the cause, not a torch stack trace; -v keeps the trace
        from autodeploy.errors import AutoDeployError

        if isinstance(exc, AutoDeployError) and not args.verbose:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
