"""Fused next-token sampling: temperature, top-k, top-p and min-p per row, in one launch, without a sort.

**Semantics** (identical in the Triton kernel and the torch reference below). For a row of logits ``x`` with
maximum ``m`` and temperature ``T > 0``, let ``e_i = exp((x_i - m) / T)`` (the unnormalised probabilities).
Token ``i`` is *kept* when all three hold:

- top-k (``0 < k``): fewer than ``k`` tokens have a strictly larger logit (ties with the k-th largest are kept,
  as HF's ``TopKLogitsWarper`` does; ``k >= vocab`` keeps every token);
- top-p (``p < 1``): the mass ``sum(e_j : x_j > x_i)`` of the kept-by-top-k tokens strictly above it is below
  ``p`` times the kept-by-top-k mass (the smallest top set reaching ``p``; ties at the boundary are all kept);
- min-p (``0 < min_p``): ``e_i >= min_p`` (its probability is at least ``min_p`` times the top token's).

The argmax always survives. The token drawn is ``argmax_i kept (x_i - m) / T + G_i`` with Gumbel noise
``G_i = -log(-log(u_i))`` (the Gumbel-max form of the exponential race: exact sampling from ``e`` restricted to
the kept set, renormalised), lowest index on ties. ``T == 0`` rows are greedy and return exactly
``torch.argmax`` (lowest index on ties, NaN wins), as :func:`argmax_rows` does.

**Randomness.** ``u_i`` comes from Philox-4x32-10 keyed by the row's 64-bit seed, with counter
``(i, step, 0, 0)`` where ``step`` is the request's generated-token index: a request's draws depend only on its
seed, its position and its logits, never on the batch it shares or on the device's thread layout. The torch
implementation computes the same Philox words, so the CPU path and the kernel draw the same ``u``
(``(word >> 9) + 0.5) * 2**-23``, exact in fp32; tested); their tokens can differ only where the two sides'
``exp``/``log`` round differently right at a decision boundary.

**Sort-free thresholds.** The kept set is ``{x >= threshold}`` for top-k and top-p, so the kernel searches
the threshold instead of sorting: each pass evaluates ``NP`` pivots at once (the count, or the mass, of logits
strictly above each), keeps the bracket ``(lo, hi]`` with the predicate false at ``lo`` and true at ``hi``,
and one pivot is always the smallest logit above ``lo``, so the search ends exactly (not within a tolerance)
as soon as that logit satisfies the predicate. The bracket shrinks ~``NP``-fold per pass; the pass count is
bounded for adversarial rows.

**One launch, split rows.** The grid is (rows, tiles of ``TILE`` logits), so a batch-1 row is spread over the
GPU. Each program summarises its tile (max and first argmax, smallest finite logit, count, exp-sum) and then:
for a row with a filter, stores its *candidates*, the tile's logits above the smallest one with at most ``C``
logits above it (the same search, in registers, then a prefix-sum compaction); for an unfiltered sampled
row, the tile's Gumbel-max winner. The last program of a row to finish (an atomic ticket; it resets the
ticket) merges the tiles: greedy rows take the argmax, unfiltered rows the best tile winner rescored on the
row's maximum, filtered rows run the threshold searches and the draw over the candidates alone, after
checking that the candidates provably hold every kept token (every logit above the largest dropped one is a
candidate, and the thresholds found lie at or above it). When that cannot be proven (top-p over a flat
distribution keeping more than the candidates, say) the same program runs the searches over the whole row.
The kept set is the same either way; ``path_out`` says which way a row went.

**Penalties** (repetition, frequency, presence; each row its own values), applied to the logits as the kernel
reads them, before anything above: ``penalties`` is a device int ``[P, V]`` tensor, one row per penalized
sequence (its parameter field ``pen_row``; -1: none), holding ``(count << 1) | in_prompt`` per token, where
``count`` is how often the sequence generated the token and ``in_prompt`` whether its prompt holds it
(:func:`write_penalty_rows` writes it). A token with a nonzero entry gets the repetition penalty ``r`` (HF's
``RepetitionPenaltyLogitsProcessor``: ``x * r`` when ``x < 0``, else ``x / r``), then every token
``x - frequency * count`` and ``x - presence * (count > 0)`` (vLLM/OpenAI, output tokens only): the same fp32
operations in the same order as ``autodeploy.runtime.sampling.apply_penalties``, correctly rounded (``div_rn``,
no fused multiply-add: launches compile with ``enable_fp_fusion=False``), so the penalized logits equal the
host path's bit for bit. Greedy rows take the argmax of the penalized logits. The program that picks a row's
token also adds it to the row's count (``+2``), so the state stays current on the device with no host round
trip; rows must be distinct within a launch.

**Layout.** The per-row parameters are one int32 ``[B, NUM_FIELDS]`` tensor (:func:`pack_params`; columns by
name in :data:`PARAM_FIELDS`): fp32 fields as their bit patterns, so one buffer (pinned host memory on a GPU,
read by the kernel through its mapped address: no copy) carries every row's settings. ``host_out``: a pinned
int64 tensor the tokens are also written to by the kernel, as
:func:`~autodeploy.backends.triton.kernels.argmax.argmax_rows` does.

Non-finite rows (NaN or +inf logits) get an unspecified token; callers check finiteness (the engine does).
"""

from __future__ import annotations

import math
import struct
from typing import Optional, Sequence

import numpy as np
import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton is an optional extra
    _HAS_TRITON = False

__all__ = ["PARAM_FIELDS", "NUM_FIELDS", "pack_params", "param_row", "sample_rows", "fused_sample",
           "reference_sample", "reference_penalize", "reference_kept", "reference_probs", "philox_uniform",
           "philox_at", "philox4x32", "penalty_state_dtype", "write_penalty_rows", "count_sampled"]

# Columns of the int32 parameter tensor (fp32 fields stored as their bits); everything indexes them by name.
PARAM_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed_lo", "seed_hi", "step", "pen_row",
                "repetition_penalty", "frequency_penalty", "presence_penalty", "unused")
NUM_FIELDS = len(PARAM_FIELDS)
_COL = {name: i for i, name in enumerate(PARAM_FIELDS)}
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_STEP = _COL["step"]
_PEN_ROW = _COL["pen_row"]
_STATE_DTYPES = (torch.int16, torch.int32)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 256  # logits per chunk of a loop over a row or the candidates
_TILE = 2048  # logits per first-phase program
# per tile: at most this many of its largest logits are candidates. A row's kept set almost never puts more
# than a few tokens in one tile (top-200 of a 128k vocabulary: ~3 per 2k tile); a row where it does falls back
# to the whole-row search, slower but the same token.
_CANDIDATES = 64
_NP = 16  # pivots per search pass over a row or the candidates
_NP_TILE = 4  # pivots per pass of the in-register tile search ([TILE, NP_TILE] tiles)
_MAX_PASSES = 96  # bound for adversarial rows (each pass shrinks the bracket >= 15-fold or ends the search)

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _f32_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(v)))[0]


def _i32(v: int) -> int:
    v &= _MASK32
    return v - (1 << 32) if v >= 1 << 31 else v


def param_row(temperature: float, top_k: int, top_p: float, min_p: float, seed: int, *,
              repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0
              ) -> list[int]:
    """One row of the parameter tensor without its per-step part (a request's constant part: ``step`` 0 and
    ``pen_row`` -1 until :func:`pack_params` sets them)."""
    seed = int(seed) & ((1 << 64) - 1)
    vals = {"temperature": _f32_bits(temperature), "top_k": _i32(min(int(top_k), 2**31 - 1)),
            "top_p": _f32_bits(top_p), "min_p": _f32_bits(min_p), "seed_lo": _i32(seed), "seed_hi": _i32(seed >> 32),
            "step": 0, "pen_row": -1, "repetition_penalty": _f32_bits(repetition_penalty),
            "frequency_penalty": _f32_bits(frequency_penalty), "presence_penalty": _f32_bits(presence_penalty),
            "unused": 0}
    return [vals[name] for name in PARAM_FIELDS]


def pack_params(rows: Sequence[Sequence[int]], steps: Sequence[int], out: Optional[torch.Tensor] = None,
                pen_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The int32 ``[B, NUM_FIELDS]`` parameter tensor from :func:`param_row` rows and each row's
    generated-token index; ``pen_rows``: each row's row of the ``penalties`` state (-1: no penalties).

    ``out``: a CPU (e.g. pinned) int32 tensor of that shape to fill in place; otherwise a new CPU tensor."""
    arr = np.asarray(rows, dtype=np.int32).reshape(len(rows), NUM_FIELDS)
    arr[:, _STEP] = np.asarray(steps, dtype=np.int64) & 0x7FFFFFFF
    if pen_rows is not None:
        arr[:, _PEN_ROW] = np.asarray(pen_rows, dtype=np.int64).reshape(len(rows))
    if out is None:
        return torch.from_numpy(arr)
    if out.shape != (len(rows), NUM_FIELDS) or out.dtype != torch.int32 or out.device.type != "cpu":
        raise ValueError(f"out must be a CPU int32 tensor of shape ({len(rows)}, {NUM_FIELDS})")
    out.numpy()[:] = arr
    return out


def _unpack(params: torch.Tensor) -> dict[str, torch.Tensor]:
    p = params.to("cpu", torch.int32)
    f = p.view(torch.float32)
    out = {name: (f if name in _FLOAT_FIELDS else p)[:, i].clone() for i, name in enumerate(PARAM_FIELDS)}
    out["top_k"] = out["top_k"].to(torch.int64)
    out["pen_row"] = out["pen_row"].to(torch.int64)
    for name in ("seed_lo", "seed_hi", "step"):
        out[name] = out[name].to(torch.int64) & _MASK32
    return out


def _check(logits: torch.Tensor, params: torch.Tensor, host_out: Optional[torch.Tensor],
           penalties: Optional[torch.Tensor] = None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"sampling takes logits [B, V], got shape {tuple(logits.shape)}")
    b = logits.shape[0]
    if params.shape != (b, NUM_FIELDS) or params.dtype != torch.int32:
        raise ValueError(f"params must be int32 of shape ({b}, {NUM_FIELDS}) (pack_params), got "
                         f"{params.dtype} {tuple(params.shape)}")
    if host_out is not None and (host_out.shape != (b,) or host_out.dtype != torch.int64):
        raise ValueError(f"host_out must be an int64 tensor of shape ({b},)")
    if penalties is None:
        return
    if penalties.dim() != 2 or penalties.shape[1] != logits.shape[1] or penalties.dtype not in _STATE_DTYPES \
            or penalties.device != logits.device or not penalties.is_contiguous():
        raise ValueError(f"penalties must be a contiguous int16/int32 tensor [P, {logits.shape[1]}] on "
                         f"{logits.device}, got {penalties.dtype} {tuple(penalties.shape)} on {penalties.device}")
    if params.device.type == "cpu":  # host memory: checking the rows costs no synchronisation
        rows = params[:, _PEN_ROW].numpy()
        used = rows[rows >= 0]
        if (rows < -1).any() or (used >= penalties.shape[0]).any() or len(np.unique(used)) != len(used):
            raise ValueError(f"pen_row must be -1 or distinct rows of penalties [0, {penalties.shape[0]}), "
                             f"got {rows.tolist()}")


def sample_rows(logits: torch.Tensor, params: torch.Tensor, host_out: Optional[torch.Tensor] = None,
                row_sums: Optional[torch.Tensor] = None, penalties: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] under ``params`` (:func:`pack_params`), int64 on logits' device.

    The Triton kernel on CUDA tensors; the torch implementation of the same maths elsewhere. ``host_out``
    (pinned on a GPU) also receives the tokens, asynchronously; ``row_sums`` (fp32 ``[B]``, pinned on a GPU)
    each row's fp32 logit sum of the raw logits (a finiteness check from the same pass, as ``argmax_rows``
    offers). ``penalties``: the penalty state of the rows with a ``pen_row`` (module docstring); the tokens
    picked are added to it."""
    _check(logits, params, host_out, penalties)
    if _HAS_TRITON and logits.is_cuda and logits.dtype in _DTYPES and logits.shape[0] and logits.shape[1]:
        return fused_sample(logits, params, host_out, row_sums=row_sums, penalties=penalties)
    out = reference_sample(logits, params, penalties)
    if penalties is not None:
        count_sampled(penalties, params, out)
    if host_out is not None:
        host_out.copy_(out, non_blocking=True)
    if row_sums is not None:
        row_sums.copy_(torch.sum(logits, dim=-1, dtype=torch.float32), non_blocking=True)
    return out


def fused_sample(logits: torch.Tensor, params: torch.Tensor, host_out: Optional[torch.Tensor] = None,
                 threshold_out: Optional[torch.Tensor] = None, path_out: Optional[torch.Tensor] = None,
                 tile: Optional[int] = None, candidates: Optional[int] = None,
                 row_sums: Optional[torch.Tensor] = None, penalties: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """The Triton kernel behind :func:`sample_rows` (any device Triton runs on, the interpreter included).

    ``params`` may live in pinned host memory (read through its mapped address) or on the device.
    Diagnostics, for tests: ``threshold_out`` (fp32 ``[B]``) receives each row's top-k/top-p threshold ``lo``
    (the row keeps the logits ``> lo`` whose ``e_i >= min_p``; -inf when neither filter cut) and ``path_out``
    (int32 ``[B]``) the path the row took (see ``_sample_kernel``). ``tile``/``candidates``: logits per
    first-phase program and candidates it keeps (powers of two, ``candidates < tile``). ``penalties``: as in
    :func:`sample_rows` (updated in place)."""
    _check(logits, params, host_out, penalties)
    b, v = logits.shape
    if b == 0 or v == 0:
        return logits.argmax(dim=-1)  # torch's own result (or error) for an empty reduction
    if logits.is_cuda and host_out is not None and not host_out.is_pinned():
        raise ValueError("host_out must be pinned host memory")
    if logits.is_cuda and params.device.type == "cpu" and not params.is_pinned():
        params = params.to(logits.device, non_blocking=True)
    for name, t, dtype in (("threshold_out", threshold_out, torch.float32), ("path_out", path_out, torch.int32),
                           ("row_sums", row_sums, torch.float32)):
        if t is not None and (t.shape != (b,) or t.dtype != dtype):
            raise ValueError(f"{name} must be a {dtype} tensor of shape ({b},)")
    tile = tile or _TILE
    c = candidates or _CANDIDATES
    if tile & (tile - 1) or c & (c - 1) or not 1 < c < tile:
        raise ValueError(f"tile ({tile}) and candidates ({c}) must be powers of two with candidates < tile")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    params = params.contiguous()
    dev = logits.device
    n_tiles = triton.cdiv(v, tile)
    out = torch.empty((b,), dtype=torch.int64, device=dev)
    fstat = torch.empty((b, n_tiles, 8), dtype=torch.float32, device=dev)
    istat = torch.empty((b, n_tiles, 4), dtype=torch.int32, device=dev)
    cval = torch.empty((b, n_tiles * c), dtype=torch.float32, device=dev)
    cidx = torch.empty((b, n_tiles * c), dtype=torch.int32, device=dev)
    # the interpreter pays per chunk, a GPU per register: wide chunks there, narrow ones here
    block = _BLOCK if logits.is_cuda else 1024
    debug = threshold_out is not None or path_out is not None
    if debug:
        threshold_out = threshold_out if threshold_out is not None else torch.empty(b, device=dev)
        path_out = path_out if path_out is not None else torch.empty(b, dtype=torch.int32, device=dev)
    _sample_kernel[(b, n_tiles)](
        logits, logits.stride(0), v, params, out, host_out if host_out is not None else out,
        threshold_out if threshold_out is not None else fstat, path_out if path_out is not None else istat,
        fstat, istat, cval, cidx, _counters(dev, b), row_sums if row_sums is not None else fstat,
        penalties if penalties is not None else istat, n_tiles, TILE=tile, C=c,
        NT=max(2, triton.next_power_of_2(n_tiles)), BLOCK=block, NP=_NP, NPT=_NP_TILE, MAX_PASSES=_MAX_PASSES,
        TO_HOST=host_out is not None, DEBUG_OUT=debug, ROW_SUMS=row_sums is not None, PEN=penalties is not None,
        NF=NUM_FIELDS, F_TEMP=_COL["temperature"], F_TOPK=_COL["top_k"], F_TOPP=_COL["top_p"],
        F_MINP=_COL["min_p"], F_SEED_LO=_COL["seed_lo"], F_SEED_HI=_COL["seed_hi"], F_STEP=_STEP,
        F_PEN_ROW=_PEN_ROW, F_REP=_COL["repetition_penalty"], F_FREQ=_COL["frequency_penalty"],
        F_PRES=_COL["presence_penalty"],
        # correctly rounded, uncontracted fp32 everywhere: the penalties (and so the tokens) then equal the host
        # path's, which penalizes in torch and launches this same kernel without a state
        enable_fp_fusion=False, num_warps=8 if logits.is_cuda else 4)
    return out


_COUNTER_BUFS: dict[torch.device, torch.Tensor] = {}


def _counters(dev: torch.device, b: int) -> torch.Tensor:
    """Per-row tickets of the last-program merge, zero between launches (the merging program resets its own)."""
    buf = _COUNTER_BUFS.get(dev)
    if buf is None or buf.numel() < b:
        buf = torch.zeros((max(b, 256),), dtype=torch.int32, device=dev)
        _COUNTER_BUFS[dev] = buf
    return buf


# ----------------------------------------------------------------------------------- torch implementation


def philox4x32(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, k0: np.ndarray, k1: np.ndarray
               ) -> tuple[np.ndarray, ...]:
    """Philox-4x32-10 (Salmon et al., Random123) on uint32 words (numpy arrays or ints, broadcasting);
    returns the four output words as uint64 arrays holding uint32 values."""
    m0, m1 = np.uint64(_PHILOX_M0), np.uint64(_PHILOX_M1)
    mask, s32 = np.uint64(_MASK32), np.uint64(32)
    c0, c1, c2, c3, k0, k1 = (np.asarray(c, dtype=np.uint64) & mask for c in (c0, c1, c2, c3, k0, k1))
    for _ in range(10):
        p0 = c0 * m0  # < 2**64: exact in uint64
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & mask, (p0 >> s32) ^ c3 ^ k1, p0 & mask
        k0 = (k0 + np.uint64(_PHILOX_W0)) & mask
        k1 = (k1 + np.uint64(_PHILOX_W1)) & mask
    return c0, c1, c2, c3


def philox_uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, v: int) -> torch.Tensor:
    """``u`` [B, V] in (0, 1), fp32 on the CPU: Philox-4x32-10, key (seed_lo, seed_hi), counter
    (token, step, 0, 0); the kernel's ``_philox_u`` computes the same words."""
    col = lambda t: t.to("cpu", torch.int64).numpy().reshape(-1, 1)  # noqa: E731
    w0, _, _, _ = philox4x32(np.arange(v, dtype=np.uint64)[None, :], col(step), 0, 0, col(seed_lo), col(seed_hi))
    return torch.from_numpy(((w0 >> np.uint64(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23))


_G_MIN = -math.log(-math.log(0.5 * 2.0**-23))
_G_MAX = -math.log(-math.log1p(-0.5 * 2.0**-23))


def philox_at(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    """:func:`philox_uniform` at the entries ``(rows[i], cols[i])`` only (1-D index tensors)."""
    r = rows.numpy()
    pick = lambda t: t.to("cpu", torch.int64).numpy()[r]  # noqa: E731
    w0, _, _, _ = philox4x32(cols.numpy(), pick(step), 0, 0, pick(seed_lo), pick(seed_hi))
    return torch.from_numpy(((w0 >> np.uint64(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23))


def reference_kept(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """The kept set [B, V] (bool) of the module docstring, by sorting (masses in fp64). Rows with
    ``temperature <= 0`` keep only their argmax."""
    x = logits.to(torch.float32)
    b, v = x.shape
    dev = x.device
    t = temperature.to(dev, torch.float32).reshape(b, 1)
    greedy = t <= 0
    t = torch.where(greedy, torch.ones_like(t), t)
    m = x.max(dim=1, keepdim=True).values
    e = torch.exp((x - m) / t)
    k = top_k.to(dev, torch.int64).reshape(b, 1)
    n_valid = (x > float("-inf")).sum(dim=1, keepdim=True)
    k_on = (k > 0) & (k < n_valid)
    kept = torch.ones_like(x, dtype=torch.bool)
    if bool(k_on.any()):
        k_max = int(k[k_on].max())
        kth = x.topk(k_max, dim=1).values.gather(1, k.clamp(1, k_max) - 1)
        kept = torch.where(k_on, x >= kth, kept)
    p = top_p.to(dev, torch.float64).reshape(b, 1)
    p_on = p < 1
    if bool(p_on.any()):
        # the kept-by-top-k logits in descending order (all of them when some top-p row has no top-k)
        n = v if bool((p_on & ~k_on).any()) else int(kept.sum(dim=1).max())
        desc = x.topk(n, dim=1).values
        ek = torch.where(torch.where(k_on, desc >= kth, True) if bool(k_on.any()) else
                         torch.ones_like(desc, dtype=torch.bool), torch.exp((desc - m) / t), 0.0).to(torch.float64)
        # mass strictly above each position: the exclusive prefix sum at the first position of its tie group
        pos = torch.arange(n, device=dev).expand(b, n)
        starts = torch.cat([torch.ones((b, 1), dtype=torch.bool, device=dev), desc[:, 1:] != desc[:, :-1]], dim=1)
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
        above = (ek.cumsum(dim=1) - ek).gather(1, first)
        n_keep = ((above < p * ek.sum(dim=1, keepdim=True)) & (ek > 0)).sum(dim=1, keepdim=True).clamp_min(1)
        kept &= torch.where(p_on, x >= desc.gather(1, n_keep - 1), True)
    kept &= e >= min_p.to(dev, torch.float32).reshape(b, 1)
    argmax = torch.zeros_like(kept).scatter_(1, x.argmax(dim=1, keepdim=True), True)
    return torch.where(greedy, argmax, kept)


def reference_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    """The sampling distribution [B, V] (fp64) the kernel draws from; one-hot at the argmax for greedy rows."""
    x = logits.to(torch.float64)
    b = x.shape[0]
    t = temperature.to(x.device, torch.float64).reshape(b, 1)
    t = torch.where(t > 0, t, torch.ones_like(t))
    kept = reference_kept(logits, temperature, top_k, top_p, min_p)
    w = torch.where(kept, torch.exp((x - x.max(dim=1, keepdim=True).values) / t), torch.zeros_like(x))
    return w / w.sum(dim=1, keepdim=True)


def reference_sample(logits: torch.Tensor, params: torch.Tensor, penalties: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """:func:`sample_rows` in torch: the same penalties, kept set and Philox draws, int64 on logits' device
    (``penalties`` is only read: :func:`sample_rows` adds the tokens to it)."""
    b, v = logits.shape
    if b == 0 or v == 0:
        return logits.argmax(dim=-1)
    f = _unpack(params)
    x = logits.to(torch.float32) if penalties is None else reference_penalize(logits, params, penalties)
    dev = x.device
    kept = reference_kept(x, f["temperature"], f["top_k"], f["top_p"], f["min_p"])
    t = f["temperature"].to(dev).reshape(b, 1)
    greedy = (t <= 0).reshape(b)
    t = torch.where(t > 0, t, torch.ones_like(t))
    z = (x - x.max(dim=1, keepdim=True).values) / t
    # Gumbel noise lies in [_G_MIN, _G_MAX] (u is in [2**-24, 1 - 2**-24]) and the top token has z = 0, so a
    # token with z below _G_MIN - _G_MAX can never win: only the others need their Philox draws.
    rows, cols = (kept & (z >= _G_MIN - _G_MAX - 1e-3)).nonzero(as_tuple=True)
    u = philox_at(f["seed_lo"], f["seed_hi"], f["step"], rows.cpu(), cols.cpu()).to(dev)
    score = torch.full_like(z, float("-inf"))
    score[rows, cols] = z[rows, cols] - torch.log(-torch.log(u))
    return torch.where(greedy.to(dev), x.argmax(dim=1), score.argmax(dim=1))


def reference_penalize(logits: torch.Tensor, params: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """The penalized fp32 logits (a new tensor) of the rows with a ``pen_row``, by the module docstring's
    formula in the order ``runtime.sampling.apply_penalties`` uses; the other rows unchanged."""
    x = logits.to(torch.float32, copy=True)
    f = _unpack(params)
    sel = (f["pen_row"] >= 0).nonzero().reshape(-1)
    if not sel.numel():
        return x
    dev = x.device
    idx = sel.to(dev)
    s = penalties.index_select(0, f["pen_row"][sel].to(dev)).to(torch.int32)
    cnt = (s >> 1).to(torch.float32)
    col = lambda name: f[name][sel].to(dev).reshape(-1, 1)  # noqa: E731
    r = col("repetition_penalty")
    xs = x.index_select(0, idx)
    xs = torch.where(s != 0, torch.where(xs < 0, xs * r, xs / r), xs)
    xs = xs - col("frequency_penalty") * cnt
    xs = xs - col("presence_penalty") * (cnt > 0).to(torch.float32)
    x[idx] = xs
    return x


def count_sampled(penalties: torch.Tensor, params: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add each penalized row's token to its count (what the kernel does as it picks the token)."""
    rows = _unpack(params)["pen_row"]
    sel = (rows >= 0).nonzero().reshape(-1)
    if sel.numel():
        dev = penalties.device
        r, t = rows[sel].to(dev), tokens.to(dev).index_select(0, sel.to(dev))
        penalties[r, t] += 2


def penalty_state_dtype(max_count: int) -> torch.dtype:
    """The narrowest state dtype holding ``(count << 1) | 1`` exactly for every count up to ``max_count``."""
    return torch.int16 if 2 * int(max_count) + 1 <= torch.iinfo(torch.int16).max else torch.int32


def write_penalty_rows(penalties: torch.Tensor, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                       outputs: Sequence[Sequence[int]]) -> None:
    """(Re)write whole rows of the state: row ``rows[i]`` then holds ``prompts[i]`` as its prompt and counts
    ``outputs[i]``. Encoded on the host with numpy; one host-to-device copy (pinned on a GPU), no wait."""
    if not rows:
        return
    v = penalties.shape[1]
    cap = 2 * torch.iinfo(penalties.dtype).max + 1
    r_parts, t_parts, v_parts = [], [], []
    for row, prompt, out in zip(rows, prompts, outputs):
        pr = np.unique(np.asarray(prompt, dtype=np.int64))
        ot, oc = np.unique(np.asarray(out, dtype=np.int64), return_counts=True)
        toks = np.union1d(pr, ot)
        if toks.size and (toks[0] < 0 or toks[-1] >= v):
            raise ValueError(f"penalty state row {row}: token ids must lie in [0, {v})")
        if oc.size and int(oc.max()) * 2 + 1 > cap:
            raise ValueError(f"penalty state row {row}: a count of {int(oc.max())} overflows {penalties.dtype}")
        val = np.zeros(toks.shape, dtype=np.int64)
        val[np.searchsorted(toks, pr)] |= 1
        val[np.searchsorted(toks, ot)] += 2 * oc
        r_parts.append(np.full(toks.shape, row, dtype=np.int64))
        t_parts.append(toks)
        v_parts.append(val)
    rows_np = np.asarray(rows, dtype=np.int64)
    n = sum(len(t) for t in t_parts)
    buf = torch.from_numpy(np.concatenate([rows_np, *r_parts, *t_parts, *v_parts]))
    dev = penalties.device
    if dev.type == "cuda":
        buf = buf.pin_memory().to(dev, non_blocking=True)
    k = len(rows_np)
    penalties.index_fill_(0, buf[:k], 0)
    if n:
        penalties[buf[k:k + n], buf[k + n:k + 2 * n]] = buf[k + 2 * n:].to(penalties.dtype)


# ------------------------------------------------------------------------------------------------ kernel

if _HAS_TRITON:

    @triton.jit
    def _philox_u(k0, k1, c0, c1):
        """fp32 uniforms in (0, 1) from Philox-4x32-10 (key k0,k1: uint32 scalars; counter c0 [BLOCK], c1)."""
        c2 = c0 * 0
        c3 = c0 * 0
        c1 = c1 + c0 * 0
        for _ in tl.static_range(10):
            _c0 = c0
            _c2 = c2
            c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
            c1 = _c2 * 0xCD9E8D57
            c3 = _c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return ((c0 >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)

    @triton.jit
    def _penalize(x, s, rep, freq, pres):
        """Penalized fp32 logits from the state entries ``s`` ((count << 1) | in_prompt): the host path's
        operations in its order, ``div_rn`` for its correctly rounded division."""
        cnt = (s >> 1).to(tl.float32)
        # (div_rn does not broadcast: the penalty goes in at the logits' shape, exactly: rep + 0.0 == rep)
        x = tl.where(s != 0, tl.where(x < 0, x * rep, tl.math.div_rn(x, rep + tl.zeros_like(x))), x)
        x = x - freq * cnt
        return x - pres * (cnt > 0).to(tl.float32)

    @triton.jit
    def _load_row(x_row, offs, ok, pen_row, rep, freq, pres, pen_lim, PEN: tl.constexpr):
        """A chunk of a row's logits as fp32 (-inf where masked), penalized when the row has a state row."""
        x = tl.load(x_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        if PEN:
            s = tl.load(pen_row + offs, mask=ok & (offs < pen_lim), other=0).to(tl.int32)
            x = _penalize(x, s, rep, freq, pres)
        return x

    @triton.jit
    def _narrow(piv, acc, above, bound, j, lo, w, hi):
        """One pass of the threshold search: ``acc[p]`` counts (or weighs) the logits above pivot ``piv[p]``
        (``piv[0]`` is the current candidate ``w``) and ``above[p]`` is the smallest of them. Returns the narrowed
        bracket ``(lo, w, hi)`` and whether ``w`` already meets ``bound`` (then nothing moves)."""
        ok = acc < bound
        done = tl.max(tl.where((j == 0) & ok, 1, 0), 0)
        new_lo = tl.max(tl.where(ok, float("-inf"), piv), 0)
        new_hi = tl.min(tl.where(ok, piv, float("inf")), 0)
        new_w = tl.min(tl.where((piv == new_lo) & (~ok), above, float("inf")), 0)
        keep = done != 0
        return (tl.where(keep, lo, new_lo), tl.where(keep, w, new_w), tl.where(keep, hi, tl.minimum(hi, new_hi)),
                done)

    @triton.jit
    def _search(x_row, v, m, mn, t, lo, w, bound, need, pen_row, rep, freq, pres, pen_lim,
                USE_MASS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr, MAX_PASSES: tl.constexpr,
                PEN: tl.constexpr):
        """Smallest logit ``w`` whose count (or mass) of logits strictly above it is below ``bound``, starting
        from the bracket ``(lo, m]`` with ``w`` the smallest logit above ``lo``. Returns (lo, w): the tokens
        meeting the bound are exactly those ``> lo`` (equivalently ``>= w``)."""
        j = tl.arange(0, NP)
        frac = j.to(tl.float32) / NP
        hi = m
        done = 1 - need
        it = tl.full((), 0, tl.int32)
        while (done == 0) & (it < MAX_PASSES):
            lo_f = tl.maximum(lo, mn)
            piv = tl.where(j == 0, w, lo_f + (hi - lo_f) * frac)
            # lane-wise accumulators, reduced once per pass: no cross-warp reduction inside the loop
            acc2 = tl.zeros((BLOCK, NP), dtype=tl.float32)
            above2 = tl.full((BLOCK, NP), float("inf"), dtype=tl.float32)
            for start in range(0, v, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = _load_row(x_row, offs, offs < v, pen_row, rep, freq, pres, pen_lim, PEN)
                gt = x[:, None] > piv[None, :]
                if USE_MASS:
                    e = tl.exp((x - m) / t)
                    acc2 += tl.where(gt, e[:, None], 0.0)
                else:
                    acc2 += gt.to(tl.float32)
                above2 = tl.minimum(above2, tl.where(gt, x[:, None], float("inf")))
            acc = tl.sum(acc2, 0)
            above = tl.min(above2, 0)
            lo, w, hi, done = _narrow(piv, acc, above, bound, j, lo, w, hi)
            it += 1
        return lo, w

    @triton.jit
    def _search_tile(x, m, mn, bound, need, NP: tl.constexpr, MAX_PASSES: tl.constexpr):
        """:func:`_search` by count over a tile held in registers (``x``: [TILE], -inf where empty): the
        smallest ``w`` with fewer than ``bound`` logits above it; returns (lo, w), -inf when ``need`` is false."""
        j = tl.arange(0, NP)
        frac = j.to(tl.float32) / NP
        lo = tl.full((), float("-inf"), tl.float32)
        w = mn
        hi = m
        done = 1 - need.to(tl.int32)
        it = tl.full((), 0, tl.int32)
        while (done == 0) & (it < MAX_PASSES):
            lo_f = tl.maximum(lo, mn)
            piv = tl.where(j == 0, w, lo_f + (hi - lo_f) * frac)
            gt = x[:, None] > piv[None, :]
            acc = tl.sum(gt.to(tl.float32), 0)
            above = tl.min(tl.where(gt, x[:, None], float("inf")), 0)
            lo, w, hi, done = _narrow(piv, acc, above, bound, j, lo, w, hi)
            it += 1
        return lo, w

    @triton.jit
    def _draw(val_ptr, idx_ptr, n, lo, m, t, min_p, k0, k1, step, best_idx, pen_row, rep, freq, pres, pen_lim,
              USE_IDX: tl.constexpr, BLOCK: tl.constexpr, PEN: tl.constexpr):
        """Gumbel-max over the kept values of ``val_ptr[:n]`` (``> lo`` and ``e >= min_p``); token ids from
        ``idx_ptr`` (candidates) or the positions themselves (a whole row). Ties: the lowest position."""
        big: tl.constexpr = 2147483647
        best = tl.full((), float("-inf"), tl.float32)
        best_pos = tl.full((), big, tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < n
            x = _load_row(val_ptr, offs, ok, pen_row, rep, freq, pres, pen_lim, PEN)
            if tl.max(x, 0) > lo:
                if USE_IDX:
                    tok = tl.load(idx_ptr + offs, mask=ok, other=0)
                else:
                    tok = offs
                z = (x - m) / t
                kept = ok & (x > lo) & (tl.exp(z) >= min_p)
                u = _philox_u(k0, k1, tok.to(tl.uint32), step)
                score = tl.where(kept, z - tl.log(-tl.log(u)), float("-inf"))
                cbest = tl.max(score, 0)
                cpos = tl.min(tl.where(kept & (score == cbest), offs, big), 0)
                better = cbest > best
                best_pos = tl.where(better, cpos, best_pos)
                best = tl.maximum(best, cbest)
        if USE_IDX:
            found = tl.load(idx_ptr + tl.minimum(best_pos, n - 1))
        else:
            found = best_pos
        return tl.where(best_pos < big, found, best_idx)

    @triton.jit
    def _full_row(x_row, v, m, mn, n_valid, t, top_k, top_p, min_p, k0, k1, step, m_idx, pen_row, rep, freq, pres,
                  pen_lim, BLOCK: tl.constexpr, NP: tl.constexpr, MAX_PASSES: tl.constexpr, PEN: tl.constexpr):
        """The whole-row algorithm for one sampled row: thresholds by search over every logit, then the draw."""
        need_k = ((top_k > 0) & (top_k < n_valid)).to(tl.int32)
        lo = tl.full((), float("-inf"), tl.float32)
        lo, w = _search(x_row, v, m, mn, t, lo, mn, top_k.to(tl.float32), need_k, pen_row, rep, freq, pres, pen_lim,
                        False, BLOCK, NP, MAX_PASSES, PEN)
        need_p = (top_p < 1.0).to(tl.int32)
        mass = tl.full((), 0.0, tl.float32)
        if need_p != 0:
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, v, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = _load_row(x_row, offs, offs < v, pen_row, rep, freq, pres, pen_lim, PEN)
                acc += tl.where(x > lo, tl.exp((x - m) / t), 0.0)
            mass = tl.sum(acc, 0)
        lo, w = _search(x_row, v, m, mn, t, lo, w, top_p * mass, need_p, pen_row, rep, freq, pres, pen_lim, True,
                        BLOCK, NP, MAX_PASSES, PEN)
        tok = _draw(x_row, x_row, v, lo, m, t, min_p, k0, k1, step, m_idx, pen_row, rep, freq, pres, pen_lim, False,
                    BLOCK, PEN)
        return tok, lo

    @triton.jit
    def _tile_stats(x, offs, ok):
        """Per tile: max, its first index (torch.argmax order), first NaN index, smallest finite, count > -inf."""
        big: tl.constexpr = 2147483647
        is_nan = (x != x) & ok
        nan_idx = tl.min(tl.where(is_nan, offs, big), 0)
        xf = tl.where(is_nan, float("-inf"), x)
        mx = tl.max(xf, 0)
        idx = tl.min(tl.where(ok & (xf == mx), offs, big), 0)
        fin = (xf > float("-inf")) & (xf < float("inf"))
        mn = tl.min(tl.where(fin, xf, float("inf")), 0)
        nv = tl.sum((xf > float("-inf")).to(tl.int32), 0)
        return xf, mx, idx, nan_idx, mn, nv

    @triton.jit(do_not_specialize=["stride_row", "v", "n_tiles"])
    def _sample_kernel(x_ptr, stride_row, v, params_ptr, out_ptr, host_ptr, thresh_ptr, path_ptr, fstat_ptr,
                       istat_ptr, cval_ptr, cidx_ptr, counter_ptr, sums_ptr, pen_ptr, n_tiles, TILE: tl.constexpr,
                       C: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
                       NPT: tl.constexpr, MAX_PASSES: tl.constexpr, TO_HOST: tl.constexpr,
                       DEBUG_OUT: tl.constexpr, ROW_SUMS: tl.constexpr, PEN: tl.constexpr, NF: tl.constexpr,
                       F_TEMP: tl.constexpr, F_TOPK: tl.constexpr, F_TOPP: tl.constexpr, F_MINP: tl.constexpr,
                       F_SEED_LO: tl.constexpr, F_SEED_HI: tl.constexpr, F_STEP: tl.constexpr,
                       F_PEN_ROW: tl.constexpr, F_REP: tl.constexpr, F_FREQ: tl.constexpr, F_PRES: tl.constexpr):
        """Grid (rows, tiles). Every program summarises its tile (statistics; for a filtered row its top-C logits
        as candidates; for an unfiltered row its Gumbel winner); the last program of a row to finish (an
        atomic ticket) merges the tiles and picks the row's token. Paths (``path_out``): 0 greedy, 1 unfiltered
        (tile winners), 2 candidates, 3 the whole row (the candidates could not be proven to hold every kept
        token)."""
        row = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        big: tl.constexpr = 2147483647
        x_row = x_ptr + row * stride_row
        prm = params_ptr + row * NF
        t = tl.load(prm + F_TEMP).to(tl.float32, bitcast=True)
        top_k = tl.load(prm + F_TOPK)
        top_p = tl.load(prm + F_TOPP).to(tl.float32, bitcast=True)
        min_p = tl.load(prm + F_MINP).to(tl.float32, bitcast=True)
        k0 = tl.load(prm + F_SEED_LO).to(tl.uint32, bitcast=True)
        k1 = tl.load(prm + F_SEED_HI).to(tl.uint32, bitcast=True)
        step = tl.load(prm + F_STEP).to(tl.uint32, bitcast=True)
        # penalties: the row's state row (a dummy pointer and no loads without one)
        p_row = tl.load(prm + F_PEN_ROW)
        has_pen = p_row >= 0
        pen_lim = tl.where(has_pen, v, 0)  # the state's columns a masked load may read (none without a row)
        rep = tl.load(prm + F_REP).to(tl.float32, bitcast=True)
        freq = tl.load(prm + F_FREQ).to(tl.float32, bitcast=True)
        pres = tl.load(prm + F_PRES).to(tl.float32, bitcast=True)
        pen_row = pen_ptr + tl.maximum(p_row, 0).to(tl.int64) * v
        filtered = ((top_k > 0) & (top_k < v)) | (top_p < 1.0) | (min_p > 0.0)
        ts = tl.where(t > 0, t, 1.0)

        # ---- phase 1: this tile
        offs = tile * TILE + tl.arange(0, TILE)
        ok = offs < v
        x = tl.load(x_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        xp = x
        if PEN:
            s_t = tl.load(pen_row + offs, mask=ok & (offs < pen_lim), other=0).to(tl.int32)
            xp = _penalize(x, s_t, rep, freq, pres)
        xf, m_t, idx_t, nan_t, mn_t, nv_t = _tile_stats(xp, offs, ok)
        mass_t = tl.full((), 0.0, tl.float32)
        cmin_t = tl.full((), float("-inf"), tl.float32)
        win_score = tl.full((), float("-inf"), tl.float32)
        win_idx = idx_t
        if t > 0:
            if filtered:
                mass_t = tl.sum(tl.where(xf > float("-inf"), tl.exp((xf - m_t) / ts), 0.0), 0)
                # candidates: the tile's logits above the smallest tile logit with at most C logits above it
                _lo, cut = _search_tile(xf, m_t, mn_t, C + 0.5, nv_t > C, NPT, MAX_PASSES)
                cut = tl.where(nv_t > C, cut, float("-inf"))
                keep = xf > cut
                pos = tl.cumsum(keep.to(tl.int32), 0) - 1
                keep = keep & (pos < C)  # (the search always fits; this keeps a failed one in bounds)
                base = row * n_tiles * C + tile * C
                tl.store(cval_ptr + base + pos, xf, mask=keep)
                tl.store(cidx_ptr + base + pos, offs, mask=keep)
                n_keep = tl.sum(keep.to(tl.int32), 0)
                slot = tl.arange(0, C)
                tl.store(cval_ptr + base + slot, tl.full((C,), float("-inf"), tl.float32), mask=slot >= n_keep)
                tl.store(cidx_ptr + base + slot, tl.zeros((C,), tl.int32), mask=slot >= n_keep)
                cmin_t = tl.max(tl.where(keep, float("-inf"), xf), 0)  # every dropped logit is <= this
            else:
                z = (xf - m_t) / ts
                u = _philox_u(k0, k1, offs.to(tl.uint32), step)
                score = tl.where(xf > float("-inf"), z - tl.log(-tl.log(u)), float("-inf"))
                win_score = tl.max(score, 0)
                win_idx = tl.min(tl.where((score == win_score) & (xf > float("-inf")), offs, big), 0)
                win_idx = tl.where(win_idx < big, win_idx, idx_t)  # an all -inf tile: any valid index
        fs = fstat_ptr + (row * n_tiles + tile) * 8
        if ROW_SUMS:
            tl.store(fs + 4, tl.sum(tl.where(ok, x, 0.0), 0))  # raw logits: NaN and inf carry through
        tl.store(fs + 0, m_t)
        tl.store(fs + 1, mn_t)
        tl.store(fs + 2, mass_t)
        tl.store(fs + 3, cmin_t)
        ist = istat_ptr + (row * n_tiles + tile) * 4
        tl.store(ist + 0, idx_t)
        tl.store(ist + 1, nan_t)
        tl.store(ist + 2, nv_t)
        tl.store(ist + 3, win_idx)
        tl.debug_barrier()  # every thread's stores happen before the ticket is released
        ticket = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")

        # ---- phase 2: the row, in the last program to finish
        if ticket == n_tiles - 1:
            tt = tl.arange(0, NT)
            tok_ok = tt < n_tiles
            fb = fstat_ptr + (row * n_tiles + tt) * 8
            ib = istat_ptr + (row * n_tiles + tt) * 4
            ms = tl.load(fb + 0, mask=tok_ok, other=float("-inf"), volatile=True)
            mns = tl.load(fb + 1, mask=tok_ok, other=float("inf"), volatile=True)
            masses = tl.load(fb + 2, mask=tok_ok, other=0.0, volatile=True)
            cmins = tl.load(fb + 3, mask=tok_ok, other=float("-inf"), volatile=True)
            idxs = tl.load(ib + 0, mask=tok_ok, other=big, volatile=True)
            nans = tl.load(ib + 1, mask=tok_ok, other=big, volatile=True)
            nvs = tl.load(ib + 2, mask=tok_ok, other=0, volatile=True)
            wins = tl.load(ib + 3, mask=tok_ok, other=0, volatile=True)
            m = tl.max(ms, 0)
            m_idx = tl.min(tl.where(tok_ok & (ms == m), idxs, big), 0)
            nan_idx = tl.min(nans, 0)
            mn = tl.min(mns, 0)
            n_valid = tl.sum(nvs, 0)
            greedy_tok = tl.where(nan_idx < big, nan_idx, m_idx)
            sampled = (t > 0) & (nan_idx == big) & (m < float("inf")) & (m > float("-inf"))
            tok = greedy_tok
            lo = tl.full((), float("-inf"), tl.float32)
            path = tl.full((), 0, tl.int32)
            if sampled:
                if filtered:
                    nc = n_tiles * C
                    cv = cval_ptr + row * nc
                    ci = cidx_ptr + row * nc
                    b_drop = tl.max(cmins, 0)  # every logit above this is a candidate
                    total = tl.sum(tl.where(tok_ok, masses * tl.exp((ms - m) / ts), 0.0), 0)
                    need_k = ((top_k > 0) & (top_k < n_valid)).to(tl.int32)
                    lo, w = _search(cv, nc, m, mn, ts, lo, mn, top_k.to(tl.float32), need_k, pen_row, rep, freq,
                                    pres, pen_lim, False, BLOCK, NP, MAX_PASSES, False)
                    exact = (need_k == 0) | (lo >= b_drop)
                    need_p = (top_p < 1.0).to(tl.int32)
                    mass = total
                    if need_k != 0:
                        if need_p != 0:
                            acc = tl.zeros((BLOCK,), dtype=tl.float32)
                            for start in range(0, nc, BLOCK):
                                o = start + tl.arange(0, BLOCK)
                                xc = tl.load(cv + o, mask=o < nc, other=float("-inf"), volatile=True)
                                acc += tl.where(xc > lo, tl.exp((xc - m) / ts), 0.0)
                            mass = tl.sum(acc, 0)
                    lo, w = _search(cv, nc, m, mn, ts, lo, w, top_p * mass, need_p, pen_row, rep, freq, pres,
                                    pen_lim, True, BLOCK, NP, MAX_PASSES, False)
                    mp_cut = m + ts * tl.log(tl.maximum(min_p, 1e-30))
                    mp_cut = mp_cut - tl.abs(mp_cut) * 1e-5 - 1e-6  # margin for exp/log rounding
                    covered = (b_drop == float("-inf")) | (lo >= b_drop) | (
                        (need_p == 0) & (min_p > 0.0) & (mp_cut > b_drop))
                    if exact & covered:
                        tok = _draw(cv, ci, nc, lo, m, ts, min_p, k0, k1, step, m_idx, pen_row, rep, freq, pres,
                                    pen_lim, True, BLOCK, False)
                        path = tl.full((), 2, tl.int32)
                    else:
                        tok, lo = _full_row(x_row, v, m, mn, n_valid, ts, top_k, top_p, min_p, k0, k1, step,
                                            m_idx, pen_row, rep, freq, pres, pen_lim, BLOCK, NP, MAX_PASSES, PEN)
                        path = tl.full((), 3, tl.int32)
                else:
                    # the tile winners, rescored on the row's scale (the same formula as the whole-row draw)
                    wx = _load_row(x_row, wins, tok_ok, pen_row, rep, freq, pres, pen_lim, PEN)
                    u = _philox_u(k0, k1, wins.to(tl.uint32), step)
                    score = tl.where(tok_ok & (wx > float("-inf")), (wx - m) / ts - tl.log(-tl.log(u)),
                                     float("-inf"))
                    best = tl.max(score, 0)
                    tok = tl.min(tl.where(tok_ok & (score == best), wins, big), 0)
                    path = tl.full((), 1, tl.int32)
            tok = tok.to(tl.int64)
            if PEN:
                if has_pen:  # the token joins the row's counts (one program per row: a plain update)
                    cnt_ptr = pen_row + tok
                    tl.store(cnt_ptr, tl.load(cnt_ptr, mask=tok < v, other=0) + 2, mask=tok < v)
            tl.store(out_ptr + row, tok)
            if TO_HOST:
                tl.store(host_ptr + row, tok)
            if ROW_SUMS:
                tl.store(sums_ptr + row, tl.sum(tl.load(fb + 4, mask=tok_ok, other=0.0, volatile=True), 0))
            if DEBUG_OUT:
                tl.store(thresh_ptr + row, lo)
                tl.store(path_ptr + row, path)
            tl.atomic_xchg(counter_ptr + row, 0)  # ready for the next launch
