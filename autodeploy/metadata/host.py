"""The per-step metadata contract (docs/contracts.md).

Host side: :func:`nest_sequences` packs one step's sequences into every graph input in one numpy pass and
moves them to the device with ONE host-to-device copy from one (pinned, where a GPU exists) buffer
(``upload.py``). The device side (derived fields, the one metadata node) is ``fields.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from autodeploy.metadata.upload import upload

# Graph inputs the cache-insertion pass adds, in this order, after input_ids and position_ids.
STEP_INPUT_NAMES: tuple[str, ...] = (
    "cu_seqlens_q", "seq_lens_kv", "page_table", "slot_mapping", "logits_index", "batch_info",
)
# ``batch_info[0]`` of a device-composed step: the host counts are bounds only (a CUDA graph captured per token
# bucket replays the step); attention takes every per-sequence decision from cu_seqlens_q / seq_lens_kv. Such a
# step pads tokens past ``cu_seqlens_q[-1]`` (slot -1) and sequences with empty ones (no new token, no KV).
DEVICE_COMPOSED = -1
# Inputs the prepare_metadata node reads.
METADATA_OP_INPUTS: tuple[str, ...] = ("position_ids", "cu_seqlens_q", "seq_lens_kv", "page_table", "batch_info")


@dataclass
class SequenceChunk:
    """One sequence's share of a step: the new tokens, how many tokens are already cached, its pages."""

    token_ids: Sequence[int]
    num_cached: int
    pages: Sequence[int]
    want_logits: bool = True  # False for a non-final prefill chunk: its logits are never sampled
    state_slot: int = -1  # the sequence's recurrent-state slot (stateful models, runtime/state_slots.py); -1: none

    @property
    def num_new(self) -> int:
        return len(self.token_ids)


@dataclass
class StepBatch:
    """Device tensors for one forward plus the host-known counts."""

    inputs: dict[str, Tensor]
    order: list[int]  # order[i] = index (into the chunks given) of the i-th sequence in the packed layout
    logits_rows: list[int]  # logits_rows[i] = input chunk index whose logits are row i of the output
    num_tokens: int
    num_prefill: int
    num_decode: int
    bucket: int = 0  # CUDA-graph bucket this step replays (0: runs uncaptured)
    graph: Optional[object] = None  # the runner that replays it (lowering/cudagraph.py)


_INT64 = ("input_ids", "position_ids", "slot_mapping", "logits_index")
_INT32 = ("cu_seqlens_q", "seq_lens_kv", "page_table", "state_slots")


class SequencePacker:
    """Builds :class:`StepBatch` objects, reusing one staging buffer so a step allocates nothing."""

    def __init__(self, page_size: int, device: torch.device | str, max_seq_len: int = 0,
                 state_slots: bool = False):
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.state_slots = state_slots  # the graph reads ``state_slots`` (a stateful model)
        self.device = torch.device(device)
        self._host = torch.empty(0, dtype=torch.uint8)
        self._copy_done: Optional[torch.cuda.Event] = None

    def _staging(self, nbytes: int) -> Tensor:
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous async copy still reads the buffer
        if self._host.numel() < nbytes:
            pin = self.device.type == "cuda"
            self._host = torch.empty(max(nbytes, 2 * self._host.numel()), dtype=torch.uint8, pin_memory=pin)
        return self._host

    def pack(self, chunks: Sequence[SequenceChunk], all_logits: bool = False, **options) -> StepBatch:
        if self.state_slots:
            options.setdefault("state_slots", True)
        return nest_sequences(chunks, self.page_size, self.device, all_logits=all_logits, packer=self,
                              max_seq_len=self.max_seq_len, **options)


def nest_sequences(
    chunks: Sequence[SequenceChunk],
    page_size: int,
    device: torch.device | str = "cpu",
    all_logits: bool = False,
    packer: Optional[SequencePacker] = None,
    pad_to: int = 0,
    pad_page: int = 0,
    pages_width: int = 0,
    target: Optional[Tensor] = None,
    max_seq_len: int = 0,
    token_src: Optional[Tensor] = None,
    compose_on_device: Optional[tuple[int, int]] = None,
    state_slots: bool = False,
) -> StepBatch:
    """Pack sequences into the flattened layout: prefill/extend sequences first, then decodes (1 token).

    ``all_logits`` asks for the logits of every token (tests compare them with HF); otherwise only the last
    token of each chunk that wants logits is projected through the LM head.

    CUDA-graph buckets: ``pad_to`` appends dummy one-token sequences (writing into the scratch page
    ``pad_page``) up to that many sequences, ``pages_width`` fixes the page-table width, and ``target`` is the
    bucket's fixed-address device buffer that the one host-to-device copy refreshes in place.
    ``compose_on_device=(tokens, seqs)`` packs a device-composed step (:data:`DEVICE_COMPOSED`) padded to that
    many tokens and sequences, with ``seqs`` logits rows (rows past the real ones read token 0). ``max_seq_len``
    (0: unchecked) rejects a chunk that reaches past it: the compiled graph knows no later position (its RoPE
    table ends there, passes/tabulate_rope.py).

    ``token_src``: a device tensor with the new token of the first ``len(token_src)`` chunks (asynchronous decode:
    the previous step's samples, never seen by the host); the upload takes them from there. Those chunks must
    keep their order in the packed layout (one-token chunks do).

    ``state_slots``: also pack ``state_slots[B]`` (int32, each packed sequence's ``SequenceChunk.state_slot``,
    -1 for none), the step input stateful mixers read (autodeploy/ops/mixers/); one per step, shared by every
    layer, in the same upload.
    """
    if not chunks:
        raise ValueError("nest_sequences needs at least one sequence")
    if pad_to > len(chunks):
        chunks = list(chunks) + [SequenceChunk([0], 0, [pad_page])] * (pad_to - len(chunks))
    device = torch.device(device)
    if compose_on_device is None and not all_logits and all(len(c.token_ids) == 1 and c.want_logits for c in chunks):
        return _nest_decodes(chunks, page_size, device, packer, pages_width, target, max_seq_len, token_src,
                             state_slots)
    new_counts = [len(c.token_ids) for c in chunks]
    prefill = [i for i, n in enumerate(new_counts) if n != 1]
    decode = [i for i, n in enumerate(new_counts) if n == 1] if prefill else list(range(len(chunks)))
    order = prefill + decode
    q_lens = np.fromiter((new_counts[i] for i in order), dtype=np.int64, count=len(order))
    if (q_lens <= 0).any():
        raise ValueError("every scheduled sequence needs at least one new token")
    cached = np.fromiter((chunks[i].num_cached for i in order), dtype=np.int64, count=len(order))
    n_seq, n_tok = len(order), int(q_lens.sum())
    kv_lens = cached + q_lens
    _check_context(kv_lens, max_seq_len, order)
    need_pages = (kv_lens + page_size - 1) // page_size
    n_pages = np.fromiter((len(chunks[i].pages) for i in order), dtype=np.int64, count=n_seq)
    max_pages = max(1, pages_width, int(n_pages.max()))
    if (n_pages < need_pages).any():
        row = int(np.argmax(n_pages < need_pages))
        raise ValueError(f"sequence {order[row]} holds {n_pages[row]} pages but needs {need_pages[row]}")
    cu = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    seq_of_tok = np.repeat(np.arange(n_seq), q_lens)
    offset_in_chunk = np.arange(n_tok) - cu[seq_of_tok]
    positions = cached[seq_of_tok] + offset_in_chunk
    page_table = _page_table((chunks[i].pages for i in order), n_pages, max_pages)
    slots = page_table[seq_of_tok, positions // page_size] * page_size + positions % page_size
    if all_logits:
        logits_index = np.arange(n_tok)
        logits_rows = [order[s] for s in seq_of_tok.tolist()]
    else:
        want = [row for row, i in enumerate(order) if chunks[i].want_logits]
        logits_index = cu[1:][want] - 1
        logits_rows = [order[row] for row in want]
    token_ids = np.fromiter(itertools.chain.from_iterable(chunks[i].token_ids for i in order), dtype=np.int64,
                            count=n_tok)

    arrays = {
        "input_ids": token_ids, "position_ids": positions, "slot_mapping": slots,
        "logits_index": np.asarray(logits_index, dtype=np.int64),
        "cu_seqlens_q": cu, "seq_lens_kv": kv_lens, "page_table": page_table,
    }
    if state_slots:
        arrays["state_slots"] = np.fromiter((chunks[i].state_slot for i in order), dtype=np.int64, count=n_seq)
    n_prefill = len(prefill)
    if token_src is not None and order[:token_src.numel()] != list(range(token_src.numel())):
        raise ValueError("token_src covers chunks that the packed layout reorders")
    info = (n_prefill, int(q_lens[:n_prefill].sum()), len(decode), int(q_lens.max()))
    if compose_on_device is not None:
        info = _pad_device_composed(arrays, *compose_on_device)
    inputs = _device_inputs(arrays, info, max_pages, device, packer, target, token_src)
    return StepBatch(
        inputs=inputs, order=order, logits_rows=logits_rows, num_tokens=n_tok,
        num_prefill=n_prefill, num_decode=len(decode),
    )


def _pad_device_composed(arrays: dict[str, np.ndarray], num_tokens: int, num_seqs: int) -> tuple[int, ...]:
    """Pad a packed step in place to ``num_tokens`` tokens and ``num_seqs`` sequences (and logits rows) for a
    device-composed replay: padding tokens sit past the last sequence and write nowhere (slot -1); padding
    sequences are empty. Returns the step's ``batch_info``."""
    n_tok, n_seq, n_logits = arrays["input_ids"].size, arrays["seq_lens_kv"].size, arrays["logits_index"].size
    if n_tok > num_tokens or n_seq > num_seqs or n_logits > num_seqs:
        raise ValueError(f"step of {n_tok} tokens / {n_seq} sequences / {n_logits} logits rows does not fit a "
                         f"{num_tokens}-token, {num_seqs}-sequence bucket")

    def pad(name: str, size: int, value: int) -> None:
        arr = arrays[name]
        arrays[name] = np.concatenate([arr, np.full((size - arr.shape[0], *arr.shape[1:]), value, arr.dtype)])

    pad("input_ids", num_tokens, 0)
    pad("position_ids", num_tokens, 0)
    pad("slot_mapping", num_tokens, -1)
    pad("logits_index", num_seqs, 0)
    pad("cu_seqlens_q", num_seqs + 1, n_tok)
    pad("seq_lens_kv", num_seqs, 0)
    pad("page_table", num_seqs, 0)
    if "state_slots" in arrays:
        pad("state_slots", num_seqs, -1)
    return (DEVICE_COMPOSED, num_tokens, num_seqs, num_tokens)


def _nest_decodes(chunks: Sequence[SequenceChunk], page_size: int, device: torch.device,
                  packer: Optional[SequencePacker], pages_width: int, target: Optional[Tensor],
                  max_seq_len: int = 0, token_src: Optional[Tensor] = None,
                  state_slots: bool = False) -> StepBatch:
    """The steady-state step (every sequence decodes one token) with the fewest host operations."""
    n = len(chunks)
    positions = np.fromiter((c.num_cached for c in chunks), dtype=np.int64, count=n)
    _check_context(positions + 1, max_seq_len, range(n))
    n_pages = np.fromiter((len(c.pages) for c in chunks), dtype=np.int64, count=n)
    if (n_pages * page_size <= positions).any():
        row = int(np.argmax(n_pages * page_size <= positions))
        raise ValueError(f"sequence {row} holds {n_pages[row]} pages but needs {positions[row] // page_size + 1}")
    max_pages = max(1, pages_width, int(n_pages.max()))
    page_table = _page_table((c.pages for c in chunks), n_pages, max_pages)
    rows = np.arange(n)
    arrays = {
        "input_ids": np.fromiter((c.token_ids[0] for c in chunks), dtype=np.int64, count=n),
        "position_ids": positions,
        "slot_mapping": page_table[rows, positions // page_size] * page_size + positions % page_size,
        "logits_index": rows, "cu_seqlens_q": np.arange(n + 1), "seq_lens_kv": positions + 1,
        "page_table": page_table,
    }
    if state_slots:
        arrays["state_slots"] = np.fromiter((c.state_slot for c in chunks), dtype=np.int64, count=n)
    inputs = _device_inputs(arrays, (0, 0, n, 1), max_pages, device, packer, target, token_src)
    order = list(range(n))
    return StepBatch(inputs=inputs, order=order, logits_rows=order, num_tokens=n, num_prefill=0, num_decode=n)


def _check_context(kv_lens: np.ndarray, max_seq_len: int, order: Sequence[int]) -> None:
    if max_seq_len and kv_lens.size and int(kv_lens.max()) > max_seq_len:
        row = int(np.argmax(kv_lens > max_seq_len))
        raise ValueError(f"sequence {order[row]} would hold {int(kv_lens[row])} tokens, past the compiled "
                         f"max_seq_len {max_seq_len}")


def _page_table(page_lists, n_pages: np.ndarray, max_pages: int) -> np.ndarray:
    """``[B, max_pages]`` table, each row the sequence's pages left-aligned and padded with 0."""
    table = np.zeros((len(n_pages), max_pages), dtype=np.int64)
    table[np.arange(max_pages)[None, :] < n_pages[:, None]] = np.fromiter(
        itertools.chain.from_iterable(page_lists), dtype=np.int64, count=int(n_pages.sum()))
    return table


def _device_inputs(arrays: dict[str, np.ndarray], batch_info: tuple[int, int, int, int], max_pages: int,
                   device: torch.device, packer: Optional[SequencePacker],
                   target: Optional[Tensor], token_src: Optional[Tensor] = None) -> dict[str, Tensor]:
    """One upload, graph-shaped views, and the host-side ``batch_info``."""
    inputs = _to_device(arrays, device, packer, target, token_src)
    n_tok = arrays["input_ids"].size
    inputs["input_ids"] = inputs["input_ids"].view(1, n_tok)
    inputs["position_ids"] = inputs["position_ids"].view(1, n_tok)
    inputs["page_table"] = inputs["page_table"].view(-1, max_pages)
    inputs["batch_info"] = torch.tensor(batch_info, dtype=torch.int32)
    return inputs


def _dtype(name: str) -> type:
    return np.int32 if name in _INT32 else np.int64


def _section_bytes(name: str, count: int) -> int:
    """Bytes of one array's section in the packed step buffer (16-byte aligned, see _to_device)."""
    return (count * np.dtype(_dtype(name)).itemsize + 15) // 16 * 16


def step_nbytes(num_tokens: int, num_seqs: int, pages_width: int) -> int:
    """Size of the packed inputs of a step of ``num_tokens`` tokens, ``num_seqs`` sequences (and as many logits
    rows) with a ``pages_width``-wide page table: what a CUDA-graph bucket's fixed-address buffer must hold."""
    counts = {"input_ids": num_tokens, "position_ids": num_tokens, "slot_mapping": num_tokens,
              "logits_index": num_seqs, "cu_seqlens_q": num_seqs + 1, "seq_lens_kv": num_seqs,
              "page_table": num_seqs * max(1, pages_width)}
    return sum(_section_bytes(name, n) for name, n in counts.items())


def _to_device(arrays: dict[str, np.ndarray], device: torch.device, packer: Optional[SequencePacker],
               target: Optional[Tensor] = None, token_src: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Write every array into one byte buffer (16-byte aligned sections) and copy it to the device once
    (into ``target``, a fixed-address buffer, when given). 16 bytes because Triton specialises kernels on
    16-byte pointer alignment: 8-byte sections would flip it with the token count and recompile mid-serving."""
    layout, nbytes = [], 0
    for name, arr in arrays.items():
        layout.append((name, _dtype(name), nbytes, arr.size))
        nbytes += _section_bytes(name, arr.size)
    host = packer._staging(nbytes) if packer is not None else torch.empty(nbytes, dtype=torch.uint8)
    host_np = host.numpy()
    for (name, dtype, off, n) in layout:
        host_np[off : off + n * np.dtype(dtype).itemsize].view(dtype)[:] = arrays[name].reshape(-1)
    token_word = next(off for name, _, off, _ in layout if name == "input_ids") // 8  # an int64 section
    if target is not None and target.numel() < nbytes:
        raise ValueError(f"static input buffer holds {target.numel()} bytes, step needs {nbytes}")
    if target is not None:
        dev = target
    elif device.type == "cpu" and packer is None:
        dev = host  # this call's own buffer: used in place (the upload's copy is then a no-op)
    else:
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    upload(host[:nbytes], dev[:nbytes], token_src, token_word)
    if packer is not None and device.type == "cuda":
        packer._copy_done = torch.cuda.Event()
        packer._copy_done.record()
    out = {}
    for (name, dtype, off, n) in layout:
        tdtype = torch.int32 if dtype == np.int32 else torch.int64
        out[name] = dev[off : off + n * np.dtype(dtype).itemsize].view(tdtype)
    return out
