"""Load generator for ``autodeploy serve`` (or any OpenAI-compatible server on this machine).

Sends ``--num-requests`` streaming requests, at most ``--concurrency`` at a time (and, with ``--request-rate``,
Poisson arrivals), stops sending after ``--max-seconds``, and reports what vLLM's ``benchmark_serving`` reports:
request/token throughput and TTFT, TPOT, ITL and end-to-end latency (mean, median, p99, in ms).

- TTFT: request sent -> first streamed chunk (the server sends one chunk per token, text or not).
- TPOT: (latency - TTFT) / (output tokens - 1), per request (output tokens from the server's ``usage``).
- ITL: the gaps between successive streamed chunks, over all requests.

Only loopback addresses are accepted as targets. ``--start-server`` starts ``autodeploy serve`` itself (on a
free port, as a subprocess so the client does not share its interpreter) and stops it afterwards.

    python benchmarks/bench_serve.py --start-server --model smollm2 --num-requests 32 --concurrency 8
    python benchmarks/bench_serve.py --base-url http://127.0.0.1:8000 --model smollm2 --endpoint chat
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: Optional[float] = None
    latency: Optional[float] = None
    itl: list[float] = field(default_factory=list)
    error: Optional[str] = None


def loopback_only(url: str) -> urllib.parse.ParseResult:
    """Refuse any target that is not this machine."""
    u = urllib.parse.urlparse(url)
    host = u.hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok or u.scheme != "http":
        raise SystemExit(f"refusing target {url!r}: bench_serve only talks to http://127.0.0.1 (loopback)")
    return u


def make_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def one_request(u: urllib.parse.ParseResult, endpoint: str, model: str, prompt: str, max_tokens: int,
                timeout: float) -> Result:
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                  "ignore_eos": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    res = Result(ok=False)
    start = time.perf_counter()
    last = None
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            res.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return res
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                res.ok = True
                break
            msg = json.loads(data)
            if "error" in msg:
                res.error = msg["error"].get("message")
                break
            if msg.get("usage"):
                res.prompt_tokens = msg["usage"]["prompt_tokens"]
                res.output_tokens = msg["usage"]["completion_tokens"]
            if msg.get("choices"):  # a token's chunk (its text may be empty: bytes held back), as vLLM times it
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
        res.latency = time.perf_counter() - start
    except (OSError, http.client.HTTPException, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return res


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "median": None, "p99": None}
        v = sorted(values)
        p99 = v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]
        return {"mean": statistics.fmean(v) * 1e3, "median": statistics.median(v) * 1e3, "p99": p99 * 1e3}

    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.ttft is not None and r.latency is not None and r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": stats(tpot),
        "itl_ms": stats([x for r in ok for x in r.itl]),
        "e2el_ms": stats([r.latency for r in ok if r.latency is not None]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def print_report(s: dict) -> None:
    line = "=" * 50
    print(f"{line}\n{' Serving Benchmark Result ':=^50}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<40}{v:>10}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        print(f"{' ' + title + ' ':-^50}")
        for stat in ("mean", "median", "p99"):
            v = s[key][stat]
            print(f"{stat.capitalize() + ' ' + key.split('_')[0].upper() + ' (ms)':<40}"
                  f"{'n/a' if v is None else f'{v:.2f}':>10}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    print(line)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """``autodeploy serve`` on a free loopback port; returns the process and its base URL once it is healthy."""
    cmd = [sys.executable, "-m", "autodeploy.entrypoints.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", "0", "--max-seq-len", str(args.max_seq_len), "--max-batch-size", str(args.max_batch_size)]
    if args.device:
        cmd += ["--device", args.device]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    found: dict = {}

    def read_stderr() -> None:
        for line in proc.stderr:
            m = re.search(r"serving .* at (http://127\.0\.0\.1:\d+)/v1", line)
            if m and "url" not in found:
                found["url"] = m.group(1)
            else:
                sys.stderr.write(f"[server] {line}")

    threading.Thread(target=read_stderr, daemon=True).start()
    deadline = time.monotonic() + args.server_start_timeout
    while "url" not in found:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before serving")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start within {args.server_start_timeout} s")
        time.sleep(0.1)
    return proc, found["url"]


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: requests in flight finish
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(args: argparse.Namespace) -> dict:
    u = loopback_only(args.base_url)
    rng = random.Random(args.seed)
    lo, hi = (int(x) for x in args.input_len.split(":")) if ":" in args.input_len else (int(args.input_len),) * 2
    prompts = [make_prompt(rng, rng.randint(lo, hi)) for _ in range(args.num_requests)]
    arrivals, t = [], 0.0
    for _ in prompts:  # Poisson arrivals at --request-rate (inf: all at once, limited by --concurrency)
        arrivals.append(t)
        if args.request_rate != float("inf"):
            t += rng.expovariate(args.request_rate)
    model = args.served_model_name or args.model
    if args.warmup:
        one_request(u, args.endpoint, model, prompts[0], 2, args.max_seconds)
    start = time.perf_counter()
    deadline = start + args.max_seconds

    def task(i: int) -> Optional[Result]:
        wait = start + arrivals[i] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        left = deadline - time.perf_counter()
        if left <= 0:
            return None  # out of time: not sent
        return one_request(u, args.endpoint, model, prompts[i], args.output_len, left)

    with ThreadPoolExecutor(args.concurrency) as pool:
        results = [r for r in pool.map(task, range(len(prompts))) if r is not None]
    summary = summarize(results, time.perf_counter() - start)
    summary.update(not_sent=len(prompts) - len(results), concurrency=args.concurrency,
                   request_rate=args.request_rate, endpoint=args.endpoint, model=model,
                   input_len=args.input_len, output_len=args.output_len)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--model", default="smollm2", help="the model id to request (and to serve with --start-server)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: at once)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long")
    p.add_argument("--input-len", default="32:64", help="prompt words, N or MIN:MAX")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request (EOS ignored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--start-server", action="store_true", help="start `autodeploy serve --model MODEL` first")
    p.add_argument("--device", default=None)
    p.add_argument("--tokenizer", default=None, help="the served model's tokenizer (serve --tokenizer), e.g. for a "
                                                     "builtin random-weight config: --tokenizer smollm2")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--server-start-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or args.max_seconds <= 0:
        p.error("--num-requests and --concurrency must be >= 1, --max-seconds > 0")
    proc = None
    if args.start_server:
        proc, args.base_url = start_server(args)
    try:
        summary = run(args)
    finally:
        if proc is not None:
            stop_server(proc)
    print_report(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
