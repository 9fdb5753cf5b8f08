"""``autodeploy serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one compiled model.

One :class:`~autodeploy.runtime.service.EngineService` owns the engine (its own thread) and batches every
client's requests into one in-flight batch; the handlers live in :mod:`autodeploy.entrypoints.server.app`.
``ServerThread`` runs a server inside this process (tests, ``benchmarks/bench_serve.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def build_llm_app(llm: Any, *, model_name: str, max_waiting: Optional[int] = None,
                  shutdown_timeout: Optional[float] = None) -> Any:
    """The app for an :class:`~autodeploy.entrypoints.llm.LLM`: a new EngineService over its engine, shut
    down (draining) with the app."""
    from autodeploy.entrypoints.server.app import build_app
    from autodeploy.runtime.service import EngineService

    service = EngineService(llm.engine, max_waiting=max_waiting)
    return build_app(service, llm.tokenizer, model_name=model_name, max_seq_len=llm.compiled.max_seq_len,
                     default_sampling=llm.default_sampling, shutdown_timeout=shutdown_timeout)


class ServerThread:
    """uvicorn serving ``app`` from a background thread of this process; ``port=0`` picks a free port."""

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                     timeout_graceful_shutdown=None)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="autodeploy-serve", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server failed to start on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, let the requests in flight finish, run the lifespan shutdown (service drain)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("server thread still running after %.0f s: forcing exit", timeout)
            self.server.force_exit = True
            self.thread.join(5.0)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``serve`` adds to the shared compile flags (--model, --device, --max-seq-len, ...)."""
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free port)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to serve with instead of the model's own: 'smollm2' or a local directory (lets "
                        "a builtin random-weight config, e.g. builtin:llama-3.1-8b, be served and benchmarked)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="waiting requests beyond which new ones get HTTP 503 (backpressure; default: unbounded)")
    p.add_argument("--shutdown-timeout", type=float, default=None,
                   help="seconds to let requests in flight finish at shutdown (default: until they are done)")


def run_serve(args: argparse.Namespace) -> int:
    """Compile ``--model``, then serve it until interrupted (Ctrl-C lets the requests in flight finish)."""
    import uvicorn

    from autodeploy.entrypoints.common import compile_options, is_builtin, model_arg
    from autodeploy.entrypoints.llm import LLM
    from autodeploy.errors import ConfigError
    from autodeploy.runtime.engine import freeze_startup_objects

    tokenizer = None
    if getattr(args, "tokenizer", None):
        from autodeploy.models.factory import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)  # before compiling: fail fast
    elif is_builtin(args.model):
        raise ConfigError(f"--model {args.model} has no tokenizer, and the OpenAI API speaks text: serve a model "
                          "with a tokenizer (e.g. --model smollm2 or a checkpoint directory), or pass --tokenizer")
    llm = LLM(model_arg(args.model), tokenizer=tokenizer, **compile_options(args))
    if tokenizer is not None and len(tokenizer) > llm.compiled.vocab_size:
        raise ConfigError(f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens, more than the model's "
                          f"vocabulary ({llm.compiled.vocab_size}): its ids would fall outside the embedding")
    name = args.served_model_name or args.model
    app = build_llm_app(llm, model_name=name, max_waiting=args.max_waiting, shutdown_timeout=args.shutdown_timeout)
    freeze_startup_objects()  # the process serves this model until it exits: see the function
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            lifespan="on", timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            # the one line a user (or a script waiting for the port) needs; uvicorn logs at warning level here
            sys.stderr.write(f"serving {name} at http://{host}:{port}/v1 (Ctrl-C to stop)\n")
            sys.stderr.flush()

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    return 0
