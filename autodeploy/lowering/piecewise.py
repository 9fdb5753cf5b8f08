"""Piecewise CUDA graphs for prefill and mixed steps.

A step that carries prefill tokens cannot be one CUDA graph: its attention launches are sized by the step's
sequences (host counts in ``batch_info``). Everything else in the graph is token-wise (embedding, norms, GEMMs,
activations, the RoPE-table gather), so it depends on the step only through its token count. The graph is split
at the *step ops*, the nodes that read sequence metadata (the metadata node, the cached attention ops, the logits
gather and what follows it); the token-wise *pieces* between them are captured once per token-count bucket and
replayed, and the step ops run eagerly in between on the step's real, unpadded tensors.

At replay, a step of ``n`` tokens uses the smallest bucket ``T >= n``:

* a piece reads fixed-address inputs: values from another piece are that piece's outputs (fixed already);
  token-shaped values from the step or from a step op are copied into the first ``n`` rows of a static buffer
  (rows past ``n`` keep stale, finite data; every piece op is row-wise, so they never touch real rows);
  anything else (a weight, a KV cache) must keep the address it had at capture;
* a step op gets the first ``n`` rows of every piece output, and ``n`` for a token-count integer;
* the graph output's token rows are cut back to ``n``.

Which values are token-shaped (and along which dim) is not guessed: two probe steps of different token counts
run the split graph eagerly and every value whose size changes with the count, and only along one dim, is.
A graph whose pieces exchange anything else is not split (logged), and its mixed steps run uncaptured.

Memory: all buckets' pieces share one graph pool. Piece outputs are captured, replayed once, then handed on as
ordinary tensors, so the pool's blocks are freed after their last use during capture exactly as in an eager
step; the runner keeps non-owning aliases of them for replay. Replays run in capture order, so a block reused by
a later piece is only overwritten after the piece that read it has run (the CUDA-graph pool-sharing rule).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from autodeploy.lowering.cudagraph import DEFAULT_TOKEN_BUCKETS, non_owning_alias
from autodeploy.metadata import STEP_INPUT_NAMES, SequenceChunk, StepBatch
from autodeploy.numerics import rel_rms

log = logging.getLogger(__name__)

PROBE_TOKENS = (9, 23)  # two token counts unlike any model dimension: what changes between them is the token dim
_TOKEN_INT = "int"  # token-info marker of an integer equal to the token count


class PiecewiseUnsupported(RuntimeError):
    """The graph cannot be split into token-wise pieces (the reason says why); mixed steps run uncaptured."""


# ---------------------------------------------------------------------------------------------------------
# Splitting


def _is_step_op(node: fx.Node, batch_info: fx.Node) -> bool:
    return node.op == "call_function" and batch_info in node.all_input_nodes


def _is_metadata_node(node: fx.Node) -> bool:
    target = node.target
    name = getattr(getattr(target, "_schema", None), "name", "") or getattr(target, "__name__", "")
    return "prepare_metadata" in name


def partition_step_graph(graph: fx.Graph) -> tuple[dict[fx.Node, int], set[int]]:
    """Partition id per call node and the set of ids that run eagerly.

    Sequence-shaped values are the step inputs other than the tokens and positions, and everything computed from
    them, except the outputs of the cached attention ops (token-shaped by the attention contract). A node that
    reads a sequence-shaped value, or ``batch_info``, runs eagerly. Eager nodes that depend only on graph inputs
    (the metadata node) go first; the rest of the graph is cut into alternating runs in node order.
    """
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    batch_info = placeholders.get("batch_info")
    if batch_info is None:
        raise PiecewiseUnsupported("the graph has no batch_info input (not a cached graph)")
    seq_valued = {placeholders[n] for n in STEP_INPUT_NAMES if n in placeholders}
    eager: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        reads_seq = any(i in seq_valued for i in node.all_input_nodes)
        step_op = _is_step_op(node, batch_info)
        eager[node] = reads_seq or step_op
        if reads_seq and not (step_op and not _is_metadata_node(node)):
            seq_valued.add(node)
    leading: set[fx.Node] = set()
    for node, is_eager in eager.items():
        if is_eager and all(i.op in ("placeholder", "get_attr") or i in leading for i in node.all_input_nodes):
            leading.add(node)
    parts: dict[fx.Node, int] = {}
    eager_ids: set[int] = {0}
    part, kind = 0, None
    for node, is_eager in eager.items():
        if node in leading:
            parts[node] = 0
            continue
        if kind is None or is_eager != kind:
            part, kind = part + 1, is_eager
            if is_eager:
                eager_ids.add(part)
        parts[node] = part
    return parts, eager_ids


def split_step_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, bool]]:
    """``gm`` split into ``submod_<i>`` children called in order by the returned parent; maps each child's name
    to True where it runs eagerly (a step op segment) and False where it is a capturable piece."""
    parts, eager_ids = partition_step_graph(gm.graph)
    split = split_module(gm, gm, lambda n: parts[n], keep_original_order=True)
    kinds = {n.target: int(n.target.rsplit("_", 1)[1]) in eager_ids
             for n in split.graph.nodes if n.op == "call_module"}
    return split, kinds


# ---------------------------------------------------------------------------------------------------------
# Capture backends: a real CUDA graph, or (CPU tests) a re-run that keeps outputs at fixed addresses


class _CudaCapture:
    """One piece as a CUDA graph in the runner's pool, replayed once right away so its outputs hold real values
    for the eager step ops that follow during capture."""

    def __init__(self, pool: Any):
        self.pool = pool

    def capture(self, fn: Callable, args: list) -> tuple[Callable[[], None], Any]:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        try:
            out = fn(*args)
        finally:
            graph.capture_end()
        graph.replay()
        return graph.replay, out

    alias = staticmethod(non_owning_alias)


class _EmulatedCapture:
    """CPU stand-in with the same contract: replay recomputes the piece from the same static inputs and writes
    into the same output tensors, so the data plumbing (static buffers, padding rows, cutting back) is tested
    where no GPU is."""

    def capture(self, fn: Callable, args: list) -> tuple[Callable[[], None], Any]:
        out = fn(*args)
        leaves, _ = tree_flatten(out)

        def replay() -> None:
            for dst, src in zip(leaves, tree_flatten(fn(*args))[0]):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)

        return replay, out

    @staticmethod
    def alias(t: torch.Tensor) -> torch.Tensor:
        return t


# ---------------------------------------------------------------------------------------------------------
# The runner


@dataclass
class _Captured:
    replay: Callable[[], None]
    copies: list[tuple[int, torch.Tensor, int]]  # (arg index, static buffer, token dim): refreshed per step
    fixed_ptrs: dict[int, int]  # arg index -> data_ptr the graph baked in
    outputs: list  # leaves (aliases for tensors)
    spec: Any


@dataclass
class _SegmentInfo:
    name: str
    eager: bool
    sources: list  # per arg: name of the producing child, or None (graph input / constant)
    arg_tokens: list = field(default_factory=list)  # per arg: token dim, _TOKEN_INT or None


class _Segment(torch.nn.Module):
    """Stands in for one child of the split graph and hands its calls to the runner."""

    def __init__(self, runner: "PiecewiseGraphRunner", info: _SegmentInfo, child: torch.nn.Module):
        super().__init__()
        self.runner, self.info, self.child = runner, info, child

    def forward(self, *args: Any) -> Any:
        return self.runner._call(self, list(args))


def _token_info(a: Any, b: Any, n1: int, n2: int, where: str) -> Any:
    """How a value seen at token counts n1 and n2 (as ``a`` and ``b``) depends on the count."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        diff = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]] if a.dim() == b.dim() else None
        if diff == []:
            return None
        if diff is None or len(diff) != 1 or a.shape[diff[0]] != n1 or b.shape[diff[0]] != n2:
            raise PiecewiseUnsupported(f"{where}: shape {tuple(a.shape)} -> {tuple(b.shape)} is not token-wise")
        return diff[0]
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        if a == b:
            return None
        if (a, b) == (n1, n2):
            return _TOKEN_INT
        raise PiecewiseUnsupported(f"{where}: integer {a} -> {b} is not the token count")
    return None


def _check_rows(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    """``a`` and ``b`` (the same tokens' rows in two probe steps) must agree up to GEMM rounding."""
    err = rel_rms(b, a)
    if not err <= 5e-2:  # NaN fails too
        raise PiecewiseUnsupported(f"{where}: a token's values change with the other tokens of the step "
                                   f"(relative RMS {err:.2e}); the pieces are not row-wise")


class PiecewiseGraphRunner:
    """Replays the token-wise pieces of prefill/mixed steps from CUDA graphs captured per token bucket."""

    def __init__(self, cm: Any, gm: fx.GraphModule, buckets: Sequence[int] = DEFAULT_TOKEN_BUCKETS,
                 emulate: bool = False):
        self.cm = cm
        self.buckets = sorted(b for b in buckets if b <= cm.max_num_tokens)
        if not self.buckets:
            raise PiecewiseUnsupported(f"no token bucket fits max_num_tokens {cm.max_num_tokens}")
        self.capturer = _EmulatedCapture() if emulate else _CudaCapture(torch.cuda.graph_pool_handle())
        self.split, kinds = split_step_graph(gm)
        self.segments: dict[str, _SegmentInfo] = {}
        for node in self.split.graph.nodes:
            if node.op == "call_module":
                sources = [self._source(a) for a in node.args]
                info = _SegmentInfo(node.target, kinds[node.target], sources)
                self.segments[node.target] = info
                setattr(self.split, node.target, _Segment(self, info, getattr(self.split, node.target)))
        self.output_tokens: list = []
        self._mode = "eager"
        self._bucket = 0
        self._n = 0
        self._record: dict[str, list] = {}
        self._captured: dict[tuple[int, str], _Captured] = {}
        self._static: dict[tuple, torch.Tensor] = {}
        self.captured: dict[int, float] = {}  # bucket -> capture seconds
        self.replays: dict[int, int] = {}
        self.disabled = False
        self._probe()
        pieces = sum(not s.eager for s in self.segments.values())
        log.info("piecewise CUDA graphs: %d pieces around %d eager step-op segments, token buckets %s",
                 pieces, len(self.segments) - pieces, self.buckets)

    @staticmethod
    def _source(arg: Any) -> Optional[str]:
        if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is operator.getitem:
            arg = arg.args[0]
        if isinstance(arg, fx.Node) and arg.op == "call_module":
            return arg.target
        return None

    # -- routing -------------------------------------------------------------------------------------------
    def handles(self, num_tokens: int) -> bool:
        return not self.disabled and num_tokens <= self.buckets[-1]

    def bucket_for(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> Any:
        """One step through the pieces of its bucket (captured on first use)."""
        bucket = self.bucket_for(batch.num_tokens)
        if bucket not in self.captured and not self._try_capture(bucket):
            return self._run_mode("eager", batch)
        out = self._run_mode("replay", batch, bucket)
        self.replays[bucket] = self.replays.get(bucket, 0) + 1
        return self._cut_output(out, batch.num_tokens)

    def capture_all(self) -> None:
        for bucket in self.buckets:
            if bucket not in self.captured and not self._try_capture(bucket):
                return

    def _try_capture(self, bucket: int) -> bool:
        """Capture a bucket; a graph that turns out not to fit (found only while capturing) disables the runner
        with a log line, and its steps run eager from then on."""
        try:
            self._capture(bucket)
            return True
        except PiecewiseUnsupported as exc:
            self.disabled = True
            log.warning("piecewise CUDA graphs disabled (%s); prefill/mixed steps run eager", exc)
            return False

    # -- probing and capture -------------------------------------------------------------------------------
    def _run_mode(self, mode: str, batch: StepBatch, bucket: int = 0) -> Any:
        """Run the split graph with the segments in ``mode`` (eager | probe | capture | replay) for this step;
        ``bucket``: the token bucket replayed (default: the step's own token count)."""
        self._mode, self._bucket, self._n = mode, bucket or batch.num_tokens, batch.num_tokens
        try:
            return self.split(**batch.inputs, **self.cm.caches)
        finally:
            self._mode = "eager"

    def _probe_steps(self) -> tuple[list[StepBatch], Optional[torch.Tensor]]:
        """Step A: one sequence of n1 random tokens. Step B: the same sequence plus a second one, n2 tokens in all.
        Row-wise pieces give the first n1 rows of every exchanged value equal in A and B. Each sequence gets its
        own pages (the probe runs while the model is being lowered, before any request owns a page); with too
        few pages the probe shares the scratch page and skips the row comparison. Returns the steps and the pages
        they write (None when only the scratch page)."""
        n1, n2 = PROBE_TOKENS
        if self.cm.max_seq_len <= n2:
            raise PiecewiseUnsupported(f"max_seq_len {self.cm.max_seq_len} is too short for the probe ({n2} tokens)")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(1, self.cm.vocab_size), (n2,), generator=g).tolist()
        per = math.ceil(n2 / self.cm.page_size)
        own = self.cm.num_pages >= 2 * per
        pages = (list(range(per)), list(range(per, 2 * per))) if own else (self.cm.scratch_pages(n2),) * 2
        first = SequenceChunk(ids[:n1], 0, pages[0])
        steps = [self.cm.packer.pack([first]), self.cm.packer.pack([first, SequenceChunk(ids[n1:], 0, pages[1])])]
        return steps, torch.arange(2 * per, device=self.cm.device) if own else None

    @torch.inference_mode()
    def _probe(self) -> None:
        """Run the split graph on the two probe steps; record how each exchanged value depends on the token count
        and check that the pieces are row-wise (a token's values do not depend on other tokens)."""
        runs = []
        steps, pages = self._probe_steps()
        saved = {k: c[pages].clone() for k, c in self.cm.caches.items()} if pages is not None else {}
        for batch in steps:
            self._record = {}
            out = self._run_mode("probe", batch)
            runs.append((dict(self._record), tree_flatten(out)[0]))
        for k, rows in saved.items():  # the probe leaves the cache as it found it
            self.cm.caches[k][pages] = rows
        self._record = {}
        (rec1, out1), (rec2, out2) = runs
        n1, n2 = PROBE_TOKENS
        for name, info in self.segments.items():
            # a step op reads the step's own (sequence-shaped) inputs as they are: only what a piece hands it counts
            info.arg_tokens = [_token_info(x, y, n1, n2, f"{name} input {i}")
                               if not info.eager or self._from_piece(info, i) else None
                               for i, (x, y) in enumerate(zip(rec1[name], rec2[name]))]
            if pages is not None:
                for i, tok in enumerate(info.arg_tokens):
                    if tok not in (None, _TOKEN_INT) and self._from_piece(info, i):
                        _check_rows(rec1[name][i], rec2[name][i].narrow(tok, 0, n1), f"{name} input {i}")
        out_node = next(n for n in self.split.graph.nodes if n.op == "output")
        out_sources = [self._source(a) for a in tree_flatten(out_node.args[0])[0]]
        self.output_tokens = [_token_info(x, y, n1, n2, f"graph output {i}")
                              if src is not None and not self.segments[src].eager else None
                              for i, (x, y, src) in enumerate(zip(out1, out2, out_sources))]

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        t0 = time.perf_counter()
        batch = self.cm.packer.pack(self.cm.dummy_prefill(bucket))
        on_gpu = isinstance(self.capturer, _CudaCapture)
        stream = torch.cuda.Stream() if on_gpu else None
        if on_gpu:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if on_gpu else contextlib.nullcontext():
            self._run_mode("eager", batch)  # first use at this size: kernel JIT, library workspaces
            self._run_mode("capture", batch)
        if on_gpu:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        self.captured[bucket] = time.perf_counter() - t0
        log.info("captured piecewise CUDA graphs for %d-token steps in %.1f ms", bucket, self.captured[bucket] * 1e3)

    def _copied(self, info: _SegmentInfo, i: int, arg: Any) -> bool:
        """Whether piece input ``i`` is copied into a static buffer: a token-shaped tensor not made by a piece."""
        return (isinstance(arg, torch.Tensor) and not self._from_piece(info, i)
                and info.arg_tokens[i] not in (None, _TOKEN_INT))

    def _static_input(self, ordinal: int, arg: torch.Tensor, dim: int) -> torch.Tensor:
        """The fixed-address buffer for a copied piece input: shared by every piece and bucket with the
        same per-token shape, dtype and position among the piece's copied inputs (replays run in stream order,
        so a piece has read it before the next copy lands); sized for the largest bucket."""
        per_token = tuple(arg.shape[:dim]) + tuple(arg.shape[dim + 1:])
        key = (per_token, arg.dtype, dim, ordinal)
        if key not in self._static:
            self._static[key] = torch.zeros(math.prod(per_token) * self.buckets[-1], dtype=arg.dtype,
                                            device=arg.device)
        shape = list(arg.shape)
        shape[dim] = self._bucket
        return self._static[key][: math.prod(shape)].view(shape)

    def _from_piece(self, info: _SegmentInfo, i: int) -> bool:
        src = info.sources[i]
        return src is not None and not self.segments[src].eager

    def _call(self, seg: _Segment, args: list) -> Any:
        info, mode = seg.info, self._mode
        if mode in ("eager", "probe"):
            out = seg.child(*args)
            if mode == "probe":
                self._record[info.name] = list(args)
            return out
        if info.eager:
            if mode == "replay":
                args = [self._cut(a, info.arg_tokens[i]) if self._from_piece(info, i) else a
                        for i, a in enumerate(args)]
            return seg.child(*args)
        key = (self._bucket, info.name)
        if mode == "capture":
            return self._capture_piece(seg, key, args)
        entry = self._captured[key]
        for i, ptr in entry.fixed_ptrs.items():
            if args[i].data_ptr() != ptr:
                raise RuntimeError(f"piecewise CUDA graph {info.name}: input {i} moved since capture")
        for i, buf, dim in entry.copies:
            buf.narrow(dim, 0, self._n).copy_(args[i])
        entry.replay()
        return tree_unflatten(entry.outputs, entry.spec)

    def _capture_piece(self, seg: _Segment, key: tuple, args: list) -> Any:
        """Capture one piece on the step's values: copied inputs move into static buffers, other inputs (piece
        outputs, weights, caches) are read where they are. Only the buffers and addresses are kept: piece
        outputs stay owned by the caller, so their pool blocks free after their last use, as in an eager step."""
        info = seg.info
        static, fixed, copies = [], {}, []
        for i, a in enumerate(args):
            if self._copied(info, i, a):
                buf = self._static_input(len(copies), a, info.arg_tokens[i])
                buf.copy_(a)
                copies.append((i, buf, info.arg_tokens[i]))
                a = buf
            elif isinstance(a, torch.Tensor) and not self._from_piece(info, i):
                fixed[i] = a.data_ptr()
            static.append(a)
        replay, out = self.capturer.capture(seg.child, static)
        leaves, spec = tree_flatten(out)
        copied = {buf.untyped_storage().data_ptr() for _, buf, _ in copies}
        if any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in copied for x in leaves):
            raise PiecewiseUnsupported(f"{info.name} returns a view of a copied input")
        aliases = [self.capturer.alias(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        self._captured[key] = _Captured(replay, copies, fixed, aliases, spec)
        return out

    def _cut(self, value: Any, tok: Any) -> Any:
        if tok is None:
            return value
        if tok == _TOKEN_INT:
            return self._n
        return value.narrow(tok, 0, self._n)

    def _cut_output(self, out: Any, n: int) -> Any:
        leaves, spec = tree_flatten(out)
        return tree_unflatten([self._cut(x, t) for x, t in zip(leaves, self.output_tokens)], spec)
