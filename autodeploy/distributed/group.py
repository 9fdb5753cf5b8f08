"""The tensor-parallel group at run time: rank 0 drives, the other ranks replay its steps.

Rank 0 (the caller's process) runs the engine, the scheduler and the sampler. Every call that touches the
graph or the KV cache (``pack`` + ``forward``, ``copy_pages``, ``swap_out``/``swap_in``) is first sent to
the workers as a small command (the step's chunks: token ids, cached counts, pages), so every rank packs the
same step itself, runs the same compiled forward, and the graph's collectives meet. Device tensors a step needs
beyond its chunks (``token_src``, the previous step's sampled tokens) are broadcast over the group.

Commands travel over a pipe per worker when the library spawned the workers (an idle worker waits on it with no
timeout and exits when rank 0 goes away), or over a gloo ``broadcast_object_list`` under torchrun.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import logging
import os
import tempfile
import time
import traceback
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from autodeploy.distributed import rank as _rank
from autodeploy.distributed.rank import DistributedError, RankInfo, WorkerDiedError
from autodeploy.errors import AutoDeployError

log = logging.getLogger(__name__)

# How long rank 0 waits for the workers to compile (seconds).
STARTUP_TIMEOUT_S = float(os.environ.get("AUTODEPLOY_TP_STARTUP_TIMEOUT", "600"))


# -- command channels ------------------------------------------------------------------------------------
class _PipeChannel:
    def __init__(self, conns: Sequence[Any]):
        self.conns = list(conns)

    def send(self, msg: Any) -> None:
        for conn in self.conns:
            conn.send(msg)


class _CollectiveChannel:
    """torchrun: commands as a gloo broadcast from rank 0 on a group with a long timeout (idle waits)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))

    def send(self, msg: Any) -> None:
        dist.broadcast_object_list([msg], src=0, group=self.group)

    def recv(self) -> Any:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


# -- the worker side -------------------------------------------------------------------------------------
def serve(cm: Any, recv: Callable[[], Any]) -> None:
    """Replay rank 0's commands on this rank's compiled model until ``shutdown``."""
    swapped: dict[Any, Any] = {}
    while True:
        msg = recv()
        cmd = msg[0]
        if cmd == "shutdown":
            return
        if cmd == "step":
            _, chunks, all_logits, src = msg
            token_src = None
            if src is not None:
                token_src = torch.empty(src[0], dtype=src[1], device=cm.device)
                dist.broadcast(token_src, src=0)
            cm.forward(cm.pack(chunks, all_logits=all_logits, token_src=token_src))
        elif cmd == "copy_pages":
            cm.copy_pages(msg[1])
        elif cmd == "swap_out":
            swapped[msg[1]] = cm.swap_out(msg[2])
        elif cmd == "swap_in":
            cm.swap_in(msg[2], swapped.pop(msg[1]))
        else:
            raise DistributedError(f"unknown tensor-parallel command {cmd!r}")


def _worker_main(rank: int, world: int, backend: str, init_method: str, timeout_s: float,
                 build: Callable[..., Any], device: Optional[str], conn: Any) -> None:
    """A spawned rank: join the group, compile its shard, then replay rank 0's steps."""
    logging.basicConfig(level=os.environ.get("AUTODEPLOY_TP_WORKER_LOG", "WARNING"))
    try:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        else:
            torch.set_num_threads(cpu_threads(world))
        name = _rank.init_group(rank, world, backend, init_method, timeout_s)
        _rank.set_current(RankInfo(rank, world, backend, name))
        cm = build(**({"device": device} if device is not None else {}))
        conn.send(("ready", weight_bytes(cm), _shard_loading(cm)))
    except BaseException as exc:  # reported to rank 0, which raises it naming this rank
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    try:
        serve(cm, conn.recv)
    except EOFError:  # rank 0 went away: nothing left to serve
        pass
    except BaseException as exc:
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cpu_threads(world: int) -> int:
    """Intra-op threads per CPU rank: the cores shared out. Ranks that each spin as many threads as there are
    cores starve the peer they wait for in every collective (8x slower steps on 2 cores)."""
    return max(1, (os.cpu_count() or 1) // world)


def _shard_loading(cm: Any) -> Optional[dict]:
    """What this rank read from the checkpoint (``models.shard_loading.LoadStats.as_dict``), or None when it
    loaded the whole model."""
    return getattr(cm.graph_module, "meta", {}).get("shard_loading")


def weight_bytes(cm: Any) -> int:
    """Bytes of the parameters and buffers this rank's graph holds (its shard plus replicated parts)."""
    from autodeploy.graph.utils import held_bytes

    return held_bytes(cm.graph_module)


# -- the rank-0 side -------------------------------------------------------------------------------------
# The compiled model's own methods, called after the group has sent a command.
_ORIG: dict[str, Callable] = {}


class TensorParallelGroup:
    """Rank 0's handle on the group: sends each step to the workers, watches them, shuts them down."""

    def __init__(self, cm: Any, info: RankInfo, channel: Any, processes: Sequence[Any] = (),
                 conns: Sequence[Any] = (), worker_bytes: Sequence[int] = (),
                 worker_loads: Sequence[Optional[dict]] = ()):
        self.info = info
        self.channel = channel
        self.processes = list(processes)
        self.conns = list(conns)
        self.worker_bytes = list(worker_bytes)
        self.worker_loads = list(worker_loads)  # per worker rank: what it read from the checkpoint (or None)
        self.closed = False
        self.failure: Optional[DistributedError] = None
        self._cm = weakref.ref(cm)
        self._swap_id = 0
        self._pending: Any = None  # the step the workers were sent and rank 0 has not run yet
        self.restore_threads: Optional[int] = None  # rank 0's intra-op threads before the group took its share

    # every graph/cache call goes through here first
    def _send(self, msg: Any) -> None:
        self.check()
        try:
            self.channel.send(msg)
        except (OSError, EOFError, RuntimeError) as exc:
            self._fail(exc)

    def check(self) -> None:
        """Raise if the group is closed or a worker has exited (the watchdog, run before every command)."""
        if self.failure is not None:
            raise self.failure
        if self.closed:
            raise DistributedError("this tensor-parallel model was shut down")
        for r, p in enumerate(self.processes, start=1):
            if not p.is_alive():
                self._fail(None, rank=r)

    def _fail(self, exc: Optional[BaseException], rank: Optional[int] = None) -> None:
        dead = [(r, p) for r, p in enumerate(self.processes, start=1) if not p.is_alive()]
        if rank is None and dead:
            rank = dead[0][0]
        if rank is None:  # a command did not reach every worker: the ranks are out of step for good
            self.failure = DistributedError(f"sending a tensor-parallel command failed ({type(exc).__name__}: "
                                            f"{exc}); the group was stopped")
            self.shutdown()
            raise self.failure from exc
        p = self.processes[rank - 1]
        p.join(timeout=1)
        why = self._worker_message(rank)
        err = WorkerDiedError(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                              f"{': ' + why if why else ''}; the model cannot run any more steps", rank)
        self.failure = err
        self.shutdown()
        raise err from exc

    def _worker_message(self, rank: int) -> str:
        conn = self.conns[rank - 1] if rank - 1 < len(self.conns) else None
        try:
            while conn is not None and conn.poll(0):
                msg = conn.recv()
                if msg[0] == "error":
                    return msg[1]
        except (OSError, EOFError):
            pass
        return ""

    def pack(self, cm: Any, chunks: Any, all_logits: bool = False, token_src: Any = None) -> Any:
        """Pack here first (a bad step raises before any rank sees it), then send the step to the workers."""
        self.check()
        if self._pending is not None:  # the workers already run that step: run it here too, in lockstep
            log.warning("a packed tensor-parallel step was never run; running it now to keep the ranks in step")
            self.forward(cm, self._pending)
        batch = _ORIG["pack"](cm, chunks, all_logits=all_logits, token_src=token_src)
        src = None if token_src is None else (tuple(token_src.shape), token_src.dtype)
        self._send(("step", list(chunks), all_logits, src))
        self._pending = batch
        if token_src is not None:
            self._collective(dist.broadcast, token_src.contiguous(), src=0)
        return batch

    def forward(self, cm: Any, batch: Any) -> Any:
        """Run the step last packed (the one the workers run now); any other batch is refused, never run out of
        step with them."""
        if batch is not self._pending:
            raise DistributedError("a tensor-parallel forward runs the step packed just before it (cm.pack, then "
                                   "cm.forward, once); this batch is not that step")
        self._pending = None
        return self._collective(_ORIG["forward"], cm, batch)

    def copy_pages(self, cm: Any, copies: Any) -> None:
        if copies:
            self._send(("copy_pages", list(copies)))
        _ORIG["copy_pages"](cm, copies)

    def swap_out(self, cm: Any, pages: Any) -> Any:
        self._swap_id += 1
        self._send(("swap_out", self._swap_id, list(pages)))
        saved = _ORIG["swap_out"](cm, pages)
        return _Swapped(saved, self._swap_id)

    def swap_in(self, cm: Any, pages: Any, saved: Any) -> None:
        key = getattr(saved, "tp_swap_id", None)
        self._send(("swap_in", key, list(pages)))
        _ORIG["swap_in"](cm, pages, saved)

    def _collective(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run a step part that meets the workers in collectives. If it fails here, the ranks may be out of step
        (a worker still waits in a collective this rank skipped): the group is stopped, never reused."""
        self.check()
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            dead = self._first_dead(wait_s=3.0) if isinstance(exc, Exception) else None
            if dead is not None:  # a peer's socket closed before its process was reaped: name it
                self._fail(exc, rank=dead)
            self.failure = DistributedError(
                f"a tensor-parallel step failed on rank 0 ({type(exc).__name__}: {exc}); the group was stopped "
                "(its ranks may be out of step)")
            self.shutdown()
            if isinstance(exc, Exception):
                raise self.failure from exc
            raise

    def _first_dead(self, wait_s: float) -> Optional[int]:
        """The first worker rank that has exited, waiting up to ``wait_s`` for one to be reaped."""
        deadline = time.monotonic() + wait_s
        while True:
            for r, p in enumerate(self.processes, start=1):
                if not p.is_alive():
                    return r
            if time.monotonic() >= deadline or not self.processes:
                return None
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop the workers (a shutdown command, then terminate after a grace period) and leave the group."""
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            try:
                conn.send(("shutdown",))
            except (OSError, EOFError):
                pass
        if not self.conns and self.info.launched == "torchrun" and self.failure is None:
            try:
                self.channel.send(("shutdown",))
            except Exception:  # the group is already broken
                pass
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.restore_threads is not None:
            torch.set_num_threads(self.restore_threads)
        _rank.set_current(None)
        log.info("tensor-parallel group of %d ranks shut down", self.info.world_size)


class _Swapped(list):
    """``swap_out``'s host copies on rank 0, tagged with the id the workers keep theirs under."""

    def __init__(self, items: Any, key: int):
        super().__init__(items)
        self.tp_swap_id = key


def _attach(cm: Any, group: TensorParallelGroup) -> Any:
    """Route the compiled model's graph and cache calls through the group (instance attributes: the runtime
    keeps calling ``cm.pack`` / ``cm.forward`` as it always does)."""
    if not _ORIG:
        cls = type(cm)
        _ORIG.update(pack=cls.pack, forward=cls.forward, copy_pages=cls.copy_pages, swap_out=cls.swap_out,
                     swap_in=cls.swap_in)
    cm.tensor_parallel = group
    cm.pack = functools.partial(group.pack, cm)
    cm.forward = functools.partial(group.forward, cm)
    cm.copy_pages = functools.partial(group.copy_pages, cm)
    cm.swap_out = functools.partial(group.swap_out, cm)
    cm.swap_in = functools.partial(group.swap_in, cm)
    cm.shutdown = group.shutdown
    per_rank = [weight_bytes(cm), *group.worker_bytes]
    cm.report.loading.append(f"tensor parallel over {group.info.world_size} ranks ({group.info.backend}, "
                             f"{group.info.launched}); weight MiB per rank: "
                             + ", ".join(f"{b / 2**20:.2f}" for b in per_rank))
    loads = [_shard_loading(cm), *group.worker_loads]
    if group.worker_loads and all(load is not None for load in loads):
        cm.report.loading.append("checkpoint MiB read per rank (each its own shard): "
                                 + ", ".join(f"{load['total_read'] / 2**20:.2f}" for load in loads))
    atexit.register(group.shutdown)
    return cm


def launch(build: Callable[..., Any], world_size: int, device: Optional[torch.device],
           timeout_s: float = _rank.DEFAULT_TIMEOUT_S) -> Any:
    """Start ranks 1..N-1 as spawned processes, become rank 0 here, compile every shard, and return rank 0's
    compiled model with its steps routed through the group. ``build(device=...)`` compiles one rank."""
    import torch.multiprocessing as mp

    if _rank.torchrun_env() is not None:
        raise DistributedError("launched by torchrun: every rank runs compile itself")
    backend = _rank.backend_for(device)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise DistributedError(f"tensor_parallel_size={world_size} needs {world_size} CUDA devices, "
                               f"{torch.cuda.device_count()} are visible")
    fd, path = tempfile.mkstemp(prefix="autodeploy_tp_")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    init_method = f"file://{path}"
    ctx = mp.get_context("spawn")
    processes, conns = [], []

    def devices(r: int) -> Optional[str]:
        return None if device is None else str(torch.device("cuda", r) if backend == "nccl" else device)

    for r in range(1, world_size):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(r, world_size, backend, init_method, timeout_s, build,
                                                   devices(r), child),
                        name=f"autodeploy-tp-rank{r}", daemon=True)
        p.start()
        child.close()
        processes.append(p)
        conns.append(parent)
    threads = torch.get_num_threads()
    if backend == "gloo":
        torch.set_num_threads(cpu_threads(world_size))
        log.info("tensor parallel on CPU: %d intra-op threads per rank", cpu_threads(world_size))
    try:
        name = _rank.init_group(0, world_size, backend, init_method, timeout_s)
        info = RankInfo(0, world_size, backend, name)
        _rank.set_current(info)
        if backend == "nccl":
            torch.cuda.set_device(0)
        cm = build(**({"device": devices(0)} if device is not None else {}))
        ready = _wait_ready(processes, conns)
        group = TensorParallelGroup(cm, info, _PipeChannel(conns), processes, conns, [r[0] for r in ready],
                                    [r[1] for r in ready])
        group.restore_threads = threads
        return _attach(cm, group)
    except BaseException as exc:
        own = isinstance(exc, AutoDeployError) or not isinstance(exc, Exception)  # rank 0's own clear error
        cause = None if own else _startup_failure(processes, conns)
        for p in processes:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        _rank.set_current(None)
        if cause is not None:
            raise cause from exc  # a worker's own error explains rank 0's broken collective
        raise
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _startup_failure(processes: Sequence[Any], conns: Sequence[Any]) -> Optional[WorkerDiedError]:
    """The error a worker reported while compiling, if one did (rank 0 then only sees a peer vanish)."""
    for r, conn in enumerate(conns, start=1):
        try:
            if conn.poll(1.0):
                msg = conn.recv()
                if msg[0] == "error":
                    return WorkerDiedError(f"tensor-parallel worker rank {r} failed to compile: {msg[1]}", r)
        except (OSError, EOFError):
            processes[r - 1].join(timeout=1)
            return WorkerDiedError(f"tensor-parallel worker rank {r} exited with code "
                                   f"{processes[r - 1].exitcode} while compiling", r)
    return None


def _wait_ready(processes: Sequence[Any], conns: Sequence[Any]) -> list[tuple[int, Optional[dict]]]:
    """Per worker: (weight bytes, what it read from the checkpoint), once it has compiled."""
    out = []
    for r, (p, conn) in enumerate(zip(processes, conns), start=1):
        if not conn.poll(STARTUP_TIMEOUT_S):
            raise DistributedError(f"tensor-parallel worker rank {r} did not finish compiling within "
                                   f"{STARTUP_TIMEOUT_S:.0f} s")
        try:
            msg = conn.recv()
        except EOFError:
            p.join(timeout=1)
            raise WorkerDiedError(f"tensor-parallel worker rank {r} exited with code {p.exitcode} while "
                                  "compiling", r) from None
        if msg[0] == "error":
            log.debug("rank %d traceback:\n%s", r, msg[2])
            raise WorkerDiedError(f"tensor-parallel worker rank {r} failed to compile: {msg[1]}", r)
        out.append((int(msg[1]), msg[2] if len(msg) > 2 else None))
    return out


def finish(cm: Any, info: RankInfo) -> Any:
    """After a rank compiled under torchrun: rank 0 gets the driving handle; the others serve rank 0's steps
    until it shuts down, then exit the process (their ``compile`` never returns)."""
    if info.launched != "torchrun":
        return cm
    channel = _CollectiveChannel()
    if info.rank == 0:
        return _attach(cm, TensorParallelGroup(cm, info, channel))
    try:
        serve(cm, channel.recv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    raise SystemExit(0)
