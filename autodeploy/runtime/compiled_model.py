"""CompiledModel: the cached graph, its KV caches, and a forward that speaks only the metadata contract."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Optional, Sequence

import torch
from torch import fx

from autodeploy.errors import UnsupportedModelError
from autodeploy.lowering import lower_graph, resolve_lowering
from autodeploy.metadata import SequenceChunk, SequencePacker, StepBatch
from autodeploy.runtime.state_slots import StateSlotAllocator, allocate_states, stateful_lowering

log = logging.getLogger(__name__)


class _PlanningPacker(SequencePacker):
    """The packer of a backend with a host planner: ``plan_step(batch, chunks)`` runs after each pack, before the
    forward (``chunks``: the caller's, before any CUDA-graph padding; ``batch.order`` covers the padded ones)."""

    plan_step: Any = None

    def pack(self, chunks: Sequence[SequenceChunk], all_logits: bool = False, **options: Any) -> StepBatch:
        batch = super().pack(chunks, all_logits=all_logits, **options)
        self.plan_step(batch, chunks)
        return batch


class CompiledModel:
    """Owns the final GraphModule and the paged KV caches; ``forward`` runs one packed step."""

    def __init__(self, gm: fx.GraphModule, ctx: Any, info: Any, num_pages: Optional[int] = None,
                 memory_fraction: float = 0.85, enable_prefix_caching: bool = True):
        self.graph_module = gm
        self.ctx = ctx
        self.info = info
        self.report = ctx.report
        self.backend = ctx.attention_backend
        self.page_size = ctx.page_size
        self.max_batch_size = ctx.max_batch_size
        self.max_seq_len = ctx.max_seq_len
        self.max_num_tokens = ctx.max_num_tokens
        self.device = info.device
        self.dtype = info.dtype
        self.vocab_size = info.vocab_size
        # Stateful mixers (runtime/state_slots.py): one state slot per sequence (max_batch_size of them),
        # allocated before the KV pages are sized from free memory. No prefix reuse: nothing stores their state.
        self.state_specs = list(getattr(ctx, "state_specs", []))
        self.num_state_slots = self.max_batch_size if self.state_specs else 0
        self.state_caches = allocate_states(self.backend, self.state_specs, getattr(ctx, "state_input_names", []),
                                            self.num_state_slots, self.device)
        if self.state_specs and enable_prefix_caching:
            log.info("prefix caching off: the model's recurrent state is not cached with its KV pages")
            enable_prefix_caching = False
        self.enable_prefix_caching = enable_prefix_caching
        self.num_pages = self._plan_pages(num_pages, memory_fraction)
        self.caches: dict[str, torch.Tensor] = {}
        # Each layer's cache tensors, in the order of its graph inputs; their layout belongs to the backend.
        self.layer_caches: list[tuple[torch.Tensor, ...]] = []
        # One extra scratch page, never handed out by the cache manager: CUDA-graph padding rows write there.
        self.scratch_page = self.num_pages
        for spec, names in zip(ctx.attention_specs, ctx.cache_input_names):
            tensors = tuple(self.backend.allocate_cache(self.num_pages + 1, self.page_size, spec, self.dtype,
                                                        self.device))
            if len(tensors) != len(names):
                raise TypeError(f"backend {self.backend.name} allocated {len(tensors)} cache tensors for layer "
                                f"{spec.layer}, whose graph takes {len(names)} ({names})")
            self.caches.update(zip(names, tensors))
            self.layer_caches.append(tensors)
        self.caches.update(self.state_caches)
        # The backend's per-step host planner, looked up once: a backend without one costs nothing per step.
        self._plan_step = self.backend.plan_step if self.backend.has_plan_step() else None
        self.report.cache = (f"{self.num_pages} pages x {self.page_size} tokens "
                             f"({self.num_pages * self._bytes_per_page() / 2**20:.1f} MiB) on {self.device}")
        self.kv_cache_dtype = getattr(ctx, "kv_cache_dtype", "auto")
        if self.kv_cache_dtype != "auto":
            from autodeploy.ops.kv_quant import SCHEME

            self.report.cache += f"; KV cache {self.kv_cache_dtype}: {SCHEME}"
        else:
            self.report.cache += f"; KV cache {str(self.dtype).replace('torch.', '')}"
        # Every step is packed here (engine steps, warm-up, graph captures and replays), so a backend's host
        # planner sees each step the graph runs.
        if self.state_specs:
            mib = self.num_state_slots * sum(self.backend.state_bytes_per_slot(sp) for sp in self.state_specs) / 2**20
            self.report.cache += (f"; {self.num_state_slots} recurrent-state slots for {len(self.state_specs)} "
                                  f"stateful layers ({mib:.1f} MiB), prefix caching off")
        packer_cls = SequencePacker if self._plan_step is None else _PlanningPacker
        self.packer = packer_cls(self.page_size, self.device, self.max_seq_len, state_slots=bool(self.state_specs))
        if self._plan_step is not None:
            self.packer.plan_step = self._plan_step
        self._runner = gm
        self.graph_runner = None  # CudaGraphRunner when lowered with "cudagraph"
        self.mixed_graphs = None  # MixedGraphRunner (prefill/mixed steps) when lowered with "cudagraph"
        self.piecewise = None  # PiecewiseGraphRunner (prefill/mixed steps) with "cudagraph-piecewise"

    # -- cache planning --------------------------------------------------------------------------------
    def _bytes_per_page(self) -> int:
        """Cache bytes of one page over all layers, as the backend lays them out (``bytes_per_token``); layers
        may differ in head counts and in K vs V head dims."""
        return sum(self.page_size * self.backend.bytes_per_token(s, self.dtype) for s in self.ctx.attention_specs)

    def _plan_pages(self, num_pages: Optional[int], memory_fraction: float) -> int:
        per_seq = math.ceil(self.max_seq_len / self.page_size)
        full = self.max_batch_size * per_seq
        if num_pages is not None:
            if num_pages < per_seq:
                log.warning("num_pages=%d cannot hold one max_seq_len sequence (%d pages)", num_pages, per_seq)
            return int(num_pages)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * memory_fraction)
            pages = max(per_seq, min(full, budget // self._bytes_per_page()))
            log.info("KV cache: %d pages from %.1f GiB free x %.2f (full batch needs %d)",
                     pages, free / 2**30, memory_fraction, full)
            return pages
        return full

    def new_state_slots(self) -> Optional[StateSlotAllocator]:
        """The slot allocator a cache manager of this model needs (None for a stateless model)."""
        return StateSlotAllocator(self.num_state_slots) if self.state_specs else None

    # -- execution ---------------------------------------------------------------------------------------
    def lower(self, mode: str) -> None:
        mode = resolve_lowering(mode, self.device, self.backend)
        stateful_note = ""
        if self.state_specs:
            mode, stateful_note = stateful_lowering(mode)
        self._runner, reason = lower_graph(self, mode)
        reason = f"{reason}; {stateful_note}" if stateful_note else reason
        self.report.lowering, self.report.lowering_reason = mode if self._runner is not None else "eager", reason
        if self._runner is None:
            self._runner = self.graph_module

    def scratch_pages(self, num_positions: int) -> list[int]:
        """A page list covering ``num_positions`` positions, every page the scratch page: dummy steps (warm-up,
        graph captures) write their KV there, where no request's pages are."""
        return [self.scratch_page] * max(1, math.ceil(num_positions / self.page_size))

    def dummy_prefill(self, num_tokens: int) -> list[SequenceChunk]:
        """Prefill-only dummy sequences of ``num_tokens`` tokens in all, none longer than ``max_seq_len``, every KV
        write into the scratch page: the steps graph captures run on."""
        longest = self.max_seq_len
        lengths = [longest] * (num_tokens // longest) + ([num_tokens % longest] if num_tokens % longest else [])
        return [SequenceChunk([0] * n, 0, self.scratch_pages(n)) for n in lengths]

    def pack(self, chunks: Sequence[SequenceChunk], all_logits: bool = False,
             token_src: Optional[torch.Tensor] = None) -> StepBatch:
        """The step's device inputs. ``token_src``: device tokens of the first chunks (see nest_sequences).
        The backend's host planner (``AttentionBackend.plan_step``), if it has one, runs in the packer."""
        if self.graph_runner is not None and self.graph_runner.handles(chunks, all_logits):
            batch = self.graph_runner.pack(chunks, token_src)
        elif self.mixed_graphs is not None and token_src is None and self.mixed_graphs.handles(chunks, all_logits):
            batch = self.mixed_graphs.pack(chunks)
        else:
            batch = self.packer.pack(chunks, all_logits=all_logits, token_src=token_src)
        return batch

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; returns logits ``[N, vocab]``, row i for chunk ``batch.logits_rows[i]`` (a captured step
        may return padding rows after those). Valid until the next forward: graph outputs are reused."""
        if batch.graph is not None:
            out = batch.graph.run(batch)
        elif self.piecewise is not None and self.piecewise.handles(batch.num_tokens):
            out = self.piecewise.run(batch)
        else:
            return self._forward_uncaptured(batch)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits.reshape(-1, logits.shape[-1])

    def _forward_uncaptured(self, batch: StepBatch) -> torch.Tensor:
        out = self._runner(**batch.inputs, **self.caches)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits.reshape(-1, logits.shape[-1])

    @torch.inference_mode()
    def warmup(self) -> float:
        """Run uncaptured steps (a prefill crossing a page boundary, alone and with decodes) on dummy tokens and
        pick their tokens (greedy and sampled, into the engine's pinned step buffer), so real requests do not pay
        first-use JIT compiles of the prefill, extend and token kernels mid-serving (an 8B continuous-batching
        run paid 10.6 s of them; the penalty sampler's variant still compiles on first use). Sequence counts go
        through every power of two up to ``max_batch_size``: kernels size some blocks by it. Every KV write lands
        in the scratch page, which the cache manager never hands out. With CUDA graphs, every decode bucket is
        captured here too (a lazy capture stalled its first step by 130-350 ms mid-serving). Returns seconds."""
        from autodeploy.backends.triton.kernels.argmax import argmax_rows
        from autodeploy.backends.triton.kernels.sampling import pack_params, param_row, sample_rows
        from autodeploy.runtime.step_buffer import step_host_buffer

        t0 = time.perf_counter()
        n = max(1, min(self.max_num_tokens // 2, self.max_seq_len - 1, self.page_size + 3))
        pages = self.scratch_pages(n + 1)
        num_seqs = 1
        while True:
            decodes = [SequenceChunk([0], n, pages)] * (num_seqs - 1)
            logits = self._forward_uncaptured(self.packer.pack([SequenceChunk([0] * n, 0, pages)] + decodes))
            if logits.is_cuda:  # as the engine calls them: into its pinned step buffer, row sums included
                buf = step_host_buffer(num_seqs)
                argmax_rows(logits, host_out=buf.tokens, row_sums=buf.row_sums)
                prm = pack_params([param_row(1.0, 0, 1.0, 0.0, 0)] * num_seqs, [0] * num_seqs, out=buf.params)
                sample_rows(logits, prm, host_out=buf.tokens, row_sums=buf.row_sums)
            else:
                argmax_rows(logits)
            if num_seqs >= self.max_batch_size or n + 2 * num_seqs > self.max_num_tokens:
                break
            num_seqs = min(2 * num_seqs, self.max_batch_size)
        if self.graph_runner is not None:
            self.graph_runner.capture_all()
        for runner in (self.mixed_graphs, self.piecewise):
            if runner is not None:
                runner.capture_all()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def copy_pages(self, copies: Sequence[tuple[int, int]]) -> None:
        """Apply copy-on-write page copies requested by the cache manager (through the backend's layout)."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for tensors in self.layer_caches:
            self.backend.copy_pages(tensors, src, dst)

    def swap_out(self, pages: Sequence[int]) -> list[list[torch.Tensor]]:
        """Host copies of ``pages`` in every layer (the backend's ``swap_out``), to preempt a sequence and keep
        its KV. The engine preempts by recomputation today; this is the backend-owned path a swap policy uses."""
        idx = torch.tensor(list(pages), dtype=torch.int64, device=self.device)
        return [self.backend.swap_out(tensors, idx) for tensors in self.layer_caches]

    def swap_in(self, pages: Sequence[int], saved: Sequence[Sequence[torch.Tensor]]) -> None:
        """Restore ``swap_out``'s copies into ``pages`` (any free pages, not necessarily the original ones)."""
        if len(saved) != len(self.layer_caches):
            raise ValueError(f"swap_in got {len(saved)} layers, the model has {len(self.layer_caches)}")
        idx = torch.tensor(list(pages), dtype=torch.int64, device=self.device)
        for tensors, host in zip(self.layer_caches, saved):
            self.backend.swap_in(tensors, idx, host)

    # -- user API ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, sampling: Any = None,
                 **kwargs: Any) -> list[list[int]]:
        """Generate for token-id prompts (greedy unless ``sampling`` says otherwise). Returns new tokens only,
        one list per prompt; a single prompt (``[1, 2, 3]``) counts as a batch of one, as in ``LLM.generate``.
        Invalid input raises InvalidRequestError before any work starts (the rule ``LLM`` documents)."""
        from autodeploy.runtime.engine import Engine
        from autodeploy.runtime.sampling import SamplingConfig

        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if sampling is None:
            sampling = SamplingConfig(max_new_tokens=max_new_tokens, **kwargs)
        engine = Engine(self)
        return [r.output_ids for r in engine.generate(prompts, sampling)]

    def save(self, directory: Any) -> Any:
        """Write a self-contained engine (ONNX + weights, runtime config, tokenizer): runtime/engine_dir.py."""
        from autodeploy.runtime.engine_dir import save_engine

        if self.state_specs:
            raise UnsupportedModelError("saving an engine of a stateful model (recurrent mixer layers) is not "
                                        "supported: the exported engine would carry no state slots")
        return save_engine(self, directory)

    def explain(self) -> str:
        text = self.report.render()
        for label, runner in (("decode", self.graph_runner), ("mixed-step token", self.mixed_graphs),
                              ("piecewise token", self.piecewise)):
            if runner is not None and runner.captured:
                caps = ", ".join(f"{b}: {t * 1e3:.0f} ms" for b, t in sorted(runner.captured.items()))
                text += f"\n  {label} cuda graphs captured (bucket: time): {caps}"
        checks = _kernel_checks()
        if checks:
            text += "\n  kernel self-checks against the references: " + ", ".join(
                f"{what} on {dev}: {'passed' if ok else 'FAILED, the reference op serves'}"
                for (what, dev), ok in sorted(checks.items()))
        return text


def _kernel_checks() -> dict:
    """The Triton backend's per-device kernel checks run so far (none when the backend was never imported)."""
    mod = sys.modules.get("autodeploy.backends.triton.kernels.device_check")
    return mod.check_results() if mod is not None else {}
