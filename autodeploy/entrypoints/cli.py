"""Command line: autodeploy demo | generate | bench (and every subcommand registered in SUBCOMMANDS).

Subcommands are a registry: each names its module's argument and run functions by "module:function", so a
new one is one line and ``autodeploy --help`` imports none of them. Errors print one line naming the cause
and exit with status 2 (``-v`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

DESCRIPTION = "Compile a HuggingFace causal LM into a paged-KV inference graph; run, check and serve it."
EPILOG = """examples:
  autodeploy demo                                     compile SmolLM2, chat, check against HF, tokens/s
  autodeploy generate --prompt "Write a haiku about the sea."
  autodeploy generate --chat --prompt "What is the capital of France?"
  autodeploy generate --model builtin --prompt 1,2,3  random weights: token ids in, token ids out
  autodeploy bench --num-requests 64 --json results.json

models (--model): smollm2 (the default, bundled) | a local HF checkpoint directory | builtin:NAME (random
weights; NAME: {builtins})
"""


@dataclass(frozen=True)
class Subcommand:
    """One ``autodeploy NAME``: ``add_arguments(parser)`` and ``run(args) -> exit code``, as "module:function"."""

    name: str
    help: str
    run: str
    add_arguments: str
    compile_flags: bool = True  # takes the shared --model/--device/--dtype/... flags (entrypoints/common.py)


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("demo", "compile SmolLM2, answer a chat question, check logits and greedy tokens against HF, "
               "print tokens/s and the compile report", "autodeploy.entrypoints.demo:run_demo",
               "autodeploy.entrypoints.demo:add_arguments"),
    Subcommand("generate", "stream a completion (or a chat reply with --chat)",
               "autodeploy.entrypoints.cli:cmd_generate", "autodeploy.entrypoints.cli:add_generate_arguments"),
    Subcommand("bench", "synthetic serving workload: throughput, TTFT/TPOT, host overhead",
               "autodeploy.entrypoints.bench:run_bench", "autodeploy.entrypoints.bench:add_arguments"),
    Subcommand("serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
               "autodeploy.entrypoints.serve:run_serve", "autodeploy.entrypoints.serve:add_arguments"),
    Subcommand("backends", "list installed attention backends (built-in and plugins) and their capabilities",
               "autodeploy.entrypoints.backends_cmd:run", "autodeploy.entrypoints.backends_cmd:add_arguments",
               compile_flags=False),
]


def _resolve(target: str) -> Callable[..., Any]:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


# -- generate -------------------------------------------------------------------------------------------------
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True,
                   help="the prompt text (token ids 'ID,ID,...' for a model without a tokenizer, e.g. builtin)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--min-tokens", type=int, default=0, help="tokens to generate before EOS/stop may end it")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); may be repeated")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="after the text, list each token's logprob and its top N alternatives (stderr)")


def _token_ids(prompt: str) -> Optional[list[int]]:
    try:
        return [int(t) for t in prompt.split(",")]
    except ValueError:
        return None


def cmd_generate(args: argparse.Namespace) -> int:
    from autodeploy.entrypoints.common import compile_options, is_builtin, model_arg
    from autodeploy.entrypoints.llm import LLM
    from autodeploy.errors import InvalidRequestError
    from autodeploy.runtime.sampling import SamplingConfig

    ids = _token_ids(args.prompt)
    if is_builtin(args.model) and (ids is None or args.chat):  # known before compiling: fail fast
        raise InvalidRequestError(
            f"--model {args.model} has random weights and no tokenizer: pass --prompt as comma-separated token "
            "ids (e.g. 1,2,3, without --chat), or use a model with a tokenizer (e.g. --model smollm2)")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop_strings=list(args.stop),
                              min_tokens=args.min_tokens, logprobs=args.logprobs)
    llm = LLM(model_arg(args.model), **compile_options(args))
    if args.chat:
        prompt: Any = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    elif llm.tokenizer is None:
        if ids is None:
            raise InvalidRequestError("this model has no tokenizer: pass --prompt as comma-separated token ids, "
                                      "e.g. 1,2,3")
        prompt = ids
    else:
        prompt = args.prompt
    for event in llm.generate_stream([prompt], sampling):
        piece = event.text if event.text is not None else (f"{event.token_id} " if event.token_id >= 0 else "")
        sys.stdout.write(piece)
        sys.stdout.flush()
        if event.finished:
            out = event.output
            sys.stdout.write("\n")
            if out is not None and out.error:
                print(f"error: {out.error}", file=sys.stderr)
                return 2
            if args.logprobs is not None and out is not None:
                _print_logprobs(out, llm.tokenizer)
            m = out.metrics if out is not None else None
            if m is not None:
                print(f"[{m.num_generated} tokens, {out.finish_reason}, ttft {m.ttft * 1e3:.1f} ms"
                      + (f", tpot {m.tpot * 1e3:.2f} ms" if m.tpot else "") + "]", file=sys.stderr)
    return 0


def _print_logprobs(out: Any, tokenizer: Any) -> None:
    def show(t: int) -> str:
        return repr(tokenizer.decode([t])) if tokenizer is not None else str(t)

    sample = out.outputs[0] if getattr(out, "outputs", None) else None
    for tok, lps in zip(out.output_ids, (sample.logprobs if sample is not None else None) or []):
        others = ", ".join(f"{show(t)} {lp:.2f}" for t, lp in sorted(lps.items(), key=lambda kv: -kv[1]) if t != tok)
        print(f"{show(tok):>16} {lps.get(tok, float('nan')):8.3f}" + (f"   top: {others}" if others else ""),
              file=sys.stderr)


# -- main -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from autodeploy.entrypoints.common import add_compile_arguments

    from autodeploy.models.builtin import builtin_names

    parser = argparse.ArgumentParser(prog="autodeploy", description=DESCRIPTION,
                                     epilog=EPILOG.format(builtins=", ".join(builtin_names())),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(c.name for c in SUBCOMMANDS) + "}")
    for cmd in SUBCOMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.compile_flags:
            add_compile_arguments(p)
        else:
            p.add_argument("--log-json", action="store_true", help="log as JSON lines")
            p.add_argument("-v", "--verbose", action="store_true", help="INFO logging, and full tracebacks")
        _resolve(cmd.add_arguments)(p)
        p.set_defaults(fn=cmd.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from autodeploy.errors import AutoDeployError
    from autodeploy.logging_utils import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging("INFO" if args.verbose else "WARNING", json_format=args.log_json or None)
    try:
        return _resolve(args.fn)(args)
    except (AutoDeployError, ValueError, OSError) as exc:  # the cause in one line; -v keeps the trace
        if args.verbose:
            raise
        kind = "" if isinstance(exc, AutoDeployError) else f"{type(exc).__name__}: "
        print(f"error: {kind}{' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
