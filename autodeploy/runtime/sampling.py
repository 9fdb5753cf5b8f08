"""Per-request sampling parameters and a batched sampler.

The sampler turns a batch of next-token logits into tokens in one vectorized pass,
whatever mix of greedy/sampled requests and parameters the batch holds. Processing
order follows HF transformers / vLLM so outputs can be compared with them:

    fp32 -> user LogitsProcessors -> repetition penalty (prompt + output, HF)
         -> presence/frequency penalties (output only, OpenAI/vLLM)
         -> min_tokens: stop/EOS ids banned while the request is too short
         -> [requested logprobs: log_softmax here]
         -> greedy rows: argmax
         -> sampled rows: temperature -> top-k -> top-p -> min-p -> exponential race

Requested logprobs (``SamplingConfig.logprobs``) are the log-softmax of the logits after the user
processors, penalties and min_tokens ban, before temperature/top-k/top-p/min-p: the distribution the
model and the request's processors define, which is what OpenAI/vLLM clients read by default.

Randomness. The engine samples with ``streams``: every sampled row draws from a Philox stream keyed by its
request's seed (``seed + i`` for the i-th of ``n`` samples; a seed is drawn once at admission, from torch's
global RNG, when the request has none) and counted by its generated-token index. A seeded request's tokens
therefore depend only on its seed, its prompt and the model, not on the batch it shares, on asynchronous
scheduling, on preemption, or on whether its batch took the fused kernel
(``backends/triton/kernels/sampling.py``, which also applies the penalties from device-resident counts) or
this module's host-assisted path (processors, logprobs, min_tokens). Both paths penalize with the same fp32
operations (:func:`apply_penalties`), so a penalized row's logits, and its greedy tokens, are identical. The
kept set there is the kernel's (ties at the top-k / top-p boundary are all kept), which can differ from HF's
warpers exactly at ties. Called without ``streams`` (the standalone API), sampled rows use
:func:`apply_sampling_masks` (HF's warpers) and the exponential race with per-row ``torch.Generator`` s.

User code never takes the batch down: with ``isolate_errors=True`` (the engine's mode) a processor that
raises, returns the wrong shape or produces NaN/+inf (or bans every token) fails only the rows it ran on;
:attr:`SampleOutput.errors` names the processor and the cause.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from autodeploy.errors import SamplingConfigError
from autodeploy.backends.triton.kernels.argmax import argmax_rows
from autodeploy.backends.triton.kernels.sampling import pack_params, param_row, reference_kept
from autodeploy.backends.triton.kernels.sampling import sample_rows as fused_sample_rows
from autodeploy.runtime.hooks import LogitsProcessor, StoppingCriteria, StopOnStrings, StopOnTokens

__all__ = [
    "SamplingConfig",
    "SampleOutput",
    "Sampler",
    "make_generator",
    "draw_seed",
    "apply_logits_processors",
    "apply_penalties",
    "apply_sampling_masks",
    "token_counts",
    "build_stopping_criteria",
    "MAX_LOGPROBS",
]

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _fail(name: str, value: Any, allowed: str) -> SamplingConfigError:
    return SamplingConfigError(f"SamplingConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class SamplingConfig:
    """How one request picks its tokens. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    beam_width: int = 1
    length_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    stopping_criteria: list[StoppingCriteria] = field(default_factory=list)
    # None: no logprobs; 0: the sampled token's logprob; N: plus the top N (see the module docstring).
    logprobs: int | None = None
    # EOS and stop tokens are banned (and stop checks skipped) until this many tokens are generated.
    min_tokens: int = 0

    def __post_init__(self) -> None:
        # Impossible values fail where they are written, not steps later inside a shared batch.
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def needs_host_sampling(self) -> bool:
        """Whether the host sampler must see this request's row (processors, logprobs, min_tokens): it is then
        neither on the fused device path nor launched ahead by asynchronous scheduling. Penalties alone stay on
        the device (the fused kernel keeps their counts there); they only leave the one-argmax greedy path."""
        return bool(self.logits_processors) or self.logprobs is not None or self.min_tokens > 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingConfig:
        """Raise :class:`SamplingConfigError` naming the first bad field; return self.

        Checking up front gives users a message about their request instead of a
        torch error from deep inside a batched step that other requests share.
        """

        def real(name: str, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, allowed: str):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise _fail(name, v, f"must be a finite number, {allowed}")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                raise _fail(name, v, allowed)
            if hi is not None and (v > hi or (hi_open and v == hi)):
                raise _fail(name, v, allowed)

        def integer(name: str, lo: int, allowed: str):
            v = getattr(self, name)
            if not _is_int(v):
                raise _fail(name, v, f"must be an int, {allowed}")
            if v < lo:
                raise _fail(name, v, allowed)

        integer("max_new_tokens", 1, "allowed range is >= 1")
        real("temperature", 0.0, None, False, False, "allowed range is >= 0 (0 = greedy)")
        integer("top_k", 0, "allowed range is >= 0 (0 = disabled)")
        real("top_p", 0.0, 1.0, True, False, "allowed range is (0, 1]")
        real("min_p", 0.0, 1.0, False, False, "allowed range is [0, 1]")
        real("repetition_penalty", 0.0, None, True, False, "allowed range is > 0 (1 = disabled)")
        real("presence_penalty", -2.0, 2.0, False, False, "allowed range is [-2, 2]")
        real("frequency_penalty", -2.0, 2.0, False, False, "allowed range is [-2, 2]")
        real("length_penalty", None, None, False, False, "any finite number")
        integer("n", 1, "allowed range is >= 1")
        integer("beam_width", 1, "allowed range is >= 1 (1 = no beam search)")
        integer("min_tokens", 0, "allowed range is >= 0")
        if self.min_tokens > self.max_new_tokens:
            raise _fail("min_tokens", self.min_tokens, f"must be <= max_new_tokens ({self.max_new_tokens})")
        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise _fail("logprobs", self.logprobs,
                            f"must be None or an int in [0, {MAX_LOGPROBS}] (0 = the sampled token only)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise _fail("seed", self.seed, "must be None or an int in [0, 2**64)")
        if not isinstance(self.ignore_eos, bool):
            raise _fail("ignore_eos", self.ignore_eos, "must be a bool")

        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise _fail("stop_token_ids", self.stop_token_ids, "must be a list of ints")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                rng = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                raise _fail("stop_token_ids", self.stop_token_ids, f"each id must be an int in {rng}, got {t!r}")
        if not isinstance(self.stop_strings, (list, tuple)) or any(
            not isinstance(s, str) or not s for s in self.stop_strings
        ):
            raise _fail("stop_strings", self.stop_strings, "must be a list of non-empty strings")
        for name in ("logits_processors", "stopping_criteria"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or any(not callable(p) for p in v):
                raise _fail(name, v, "must be a list of callables")

        if self.is_beam_search:
            if self.temperature > 0:
                raise _fail(
                    "temperature",
                    self.temperature,
                    "beam search (beam_width > 1) with temperature > 0 (beam sampling) is unsupported; use 0",
                )
            if self.n > self.beam_width:
                raise _fail("n", self.n, f"with beam search n must be <= beam_width ({self.beam_width})")
            if self.logprobs is not None:
                raise _fail("logprobs", self.logprobs, "logprobs with beam search (beam_width > 1) is unsupported")
            if self.min_tokens:
                raise _fail("min_tokens", self.min_tokens, "min_tokens with beam search (beam_width > 1) is unsupported")
        elif self.n > 1 and self.is_greedy:
            raise _fail("n", self.n, "n > 1 needs temperature > 0 or beam search (greedy copies would be identical)")
        return self

    @classmethod
    def from_generation_config(cls, gen_config: Any, **overrides: Any) -> SamplingConfig:
        """Build a config that matches what HF ``generate`` would do with ``gen_config``.

        HF leaves unset fields as None and fills global defaults at generate time
        (do_sample=False, temperature=1.0, top_k=50, top_p=1.0); temperature/top-k/top-p/
        min-p only apply when ``do_sample`` is true, so greedy configs ignore them even
        though top_k defaults to 50. EOS ids are the caller's business (they live on the
        model, not the request). ``max_new_tokens`` keeps our default when unset since
        HF's ``max_length`` counts the prompt.
        """

        def get(name: str, default: Any) -> Any:
            v = getattr(gen_config, name, None)
            return default if v is None else v

        kw: dict[str, Any] = {"repetition_penalty": float(get("repetition_penalty", 1.0))}
        if getattr(gen_config, "max_new_tokens", None) is not None:
            kw["max_new_tokens"] = int(gen_config.max_new_tokens)
        do_sample = bool(get("do_sample", False))
        num_beams = int(get("num_beams", 1))
        num_return = int(get("num_return_sequences", 1))
        if do_sample:
            kw.update(
                temperature=float(get("temperature", 1.0)),
                top_k=int(get("top_k", 50)),
                top_p=float(get("top_p", 1.0)),
                min_p=float(get("min_p", 0.0)),
            )
        if num_beams > 1:
            kw.update(beam_width=num_beams, length_penalty=float(get("length_penalty", 1.0)))
        kw["n"] = num_return
        kw.update(overrides)
        return cls(**kw).validate()


@dataclass
class SampleOutput:
    """Chosen tokens ``[B]`` (int64) and their log-probabilities ``[B]`` (fp32, under the final sampling
    distribution, for ``return_logprobs``).

    ``errors``: rows that failed (row -> message naming the hook and the cause); their token is meaningless.
    Requested logprobs (``want_logprobs``): for the rows in ``logprob_rows``, the sampled token's logprob
    ``token_logprobs[i]`` and the top ``top_ids/top_logprobs[i, :N]`` (best first, N the row's own count),
    from the processed logits before temperature (module docstring). Device tensors: reading them is the
    caller's host synchronisation.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None  # None when the caller did not ask for them
    errors: dict[int, str] = field(default_factory=dict)
    logprob_rows: list[int] = field(default_factory=list)
    token_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def draw_seed() -> int:
    """A 63-bit seed for an unseeded sampled request, from torch's global (CPU) RNG: drawn once at admission,
    so ``torch.manual_seed`` makes unseeded runs repeatable too."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (None when unseeded: use the global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _row_params(values: Sequence[float] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row parameters as a small CPU tensor: "is this filter used at all?" checks then
    cost no device synchronisation; only the tensors actually needed are copied over."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=dtype)
    return torch.tensor(list(values), dtype=dtype)


def _hook_name(hook: Any) -> str:
    return type(hook).__name__


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` [R, V]: NaN or +inf anywhere, or every token banned (-inf): nothing sensible to sample."""
    return torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)


def apply_logits_processors(
    logits: torch.Tensor, configs: Sequence[SamplingConfig], token_ids: Sequence[Sequence[int]],
    errors: dict[int, str] | None = None,
) -> torch.Tensor:
    """Run each request's user processors, in its own list order, on ``logits`` [B, V].

    A batched processor shared by several rows at the same list position is called once
    for all of them, which is the point of batched processors (one kernel, not B).

    ``errors`` (row -> message): when given, a processor that raises, returns the wrong shape or leaves
    NaN/+inf (or bans every token) records an error naming it for the rows it ran on, and those rows are
    skipped by later processors; the other rows go on. Without it, such a processor raises.
    Cost of the check: one finiteness reduction and one host read per processor call group.
    """
    isolate = errors is not None
    if errors is None:
        errors = {}
    depth = max((len(c.logits_processors) for c in configs), default=0)
    for j in range(depth):
        groups: dict[int, tuple[LogitsProcessor, list[int]]] = {}
        for i, c in enumerate(configs):
            if len(c.logits_processors) > j and i not in errors:
                p = c.logits_processors[j]
                groups.setdefault(id(p), (p, []))[1].append(i)
        for p, rows in groups.values():
            done: list[int] = []
            if getattr(p, "batched", False):
                idx = torch.tensor(rows, device=logits.device)
                try:
                    out = p([list(token_ids[r]) for r in rows], logits[idx])
                    if not isinstance(out, torch.Tensor) or out.shape != (len(rows), logits.shape[1]):
                        raise ValueError(f"returned {_shape(out)} for logits of shape {(len(rows), logits.shape[1])}")
                    logits[idx] = out.to(logits.dtype)
                    done = rows
                except Exception as exc:  # noqa: BLE001 - user code: fail its rows, keep the batch
                    if not isolate:
                        raise _wrap(p, exc) from exc
                    for r in rows:
                        errors[r] = _hook_error(p, exc)
            else:
                for r in rows:
                    try:
                        out = p(list(token_ids[r]), logits[r])
                        if not isinstance(out, torch.Tensor) or out.shape != logits[r].shape:
                            raise ValueError(f"returned {_shape(out)} for logits of shape {tuple(logits[r].shape)}")
                        logits[r] = out.to(logits.dtype)
                        done.append(r)
                    except Exception as exc:  # noqa: BLE001 - user code: fail its row, keep the batch
                        if not isolate:
                            raise _wrap(p, exc) from exc
                        errors[r] = _hook_error(p, exc)
            if done:
                bad = _bad_rows(logits[torch.tensor(done, device=logits.device)]).tolist()
                for r, b in zip(done, bad):
                    if b:
                        msg = (f"logits processor {_hook_name(p)} produced non-finite logits "
                               "(NaN or +inf, or it banned every token)")
                        if not isolate:
                            raise ValueError(msg)
                        errors[r] = msg
    return logits


def _shape(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}, not a tensor"


def _hook_error(hook: Any, exc: BaseException) -> str:
    if isinstance(exc, ValueError) and str(exc).startswith("returned "):
        return f"logits processor {_hook_name(hook)} {exc}"
    return f"logits processor {_hook_name(hook)} raised {type(exc).__name__}: {exc}"


def _wrap(hook: Any, exc: Exception) -> Exception:
    if isinstance(exc, ValueError) and str(exc).startswith("returned "):
        return ValueError(_hook_error(hook, exc))
    return exc


def token_counts(
    token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row token counts over prompt+output and over output only, both ``[B, V]`` fp32.

    Rows are padded with the out-of-vocab id ``V`` and counted with one scatter_add into
    ``[B, V+1]``; the padding column is then dropped.
    """
    b = len(token_ids)
    max_len = max((len(t) for t in token_ids), default=0)
    padded = torch.full((b, max(max_len, 1)), vocab_size, dtype=torch.long)
    for i, t in enumerate(token_ids):
        if len(t):
            padded[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    padded = padded.to(device)
    pos = torch.arange(padded.shape[1], device=device)
    is_output = (pos[None, :] >= torch.as_tensor(list(prompt_lens), device=device)[:, None]).to(torch.float32)
    all_counts = torch.zeros(b, vocab_size + 1, device=device)
    all_counts.scatter_add_(1, padded, torch.ones_like(is_output))
    out_counts = torch.zeros(b, vocab_size + 1, device=device)
    out_counts.scatter_add_(1, padded, is_output)
    return all_counts[:, :vocab_size], out_counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    token_ids: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    repetition_penalty: Sequence[float] | torch.Tensor,
    presence_penalty: Sequence[float] | torch.Tensor,
    frequency_penalty: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Apply per-row penalties to ``logits`` [B, V] fp32 and return the result.

    Repetition penalty uses HF semantics over prompt + output (a seen token's logit is
    multiplied by the penalty when negative, divided when positive). Presence/frequency
    use OpenAI/vLLM semantics over output tokens only:
    ``logit -= frequency * count + presence * (count > 0)``.
    The fused kernel's device path repeats these fp32 operations in this order (its tests hold it to
    bit-equality), so change both together.
    """
    dev = logits.device
    v = logits.shape[1]
    rep = _row_params(repetition_penalty, torch.float32)
    pres = _row_params(presence_penalty, torch.float32)
    freq = _row_params(frequency_penalty, torch.float32)
    all_counts, out_counts = token_counts(token_ids, prompt_lens, v, dev)
    if bool((rep != 1.0).any()):
        r = rep.to(dev)[:, None]
        penalized = torch.where(logits < 0, logits * r, logits / r)
        logits = torch.where(all_counts > 0, penalized, logits)
    if bool((freq != 0).any()):
        logits = logits - freq.to(dev)[:, None] * out_counts
    if bool((pres != 0).any()):
        logits = logits - pres.to(dev)[:, None] * (out_counts > 0).to(logits.dtype)
    return logits


def apply_sampling_masks(
    logits: torch.Tensor,
    temperature: Sequence[float] | torch.Tensor,
    top_k: Sequence[int] | torch.Tensor,
    top_p: Sequence[float] | torch.Tensor,
    min_p: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Temperature-scale ``logits`` [B, V] and set tokens removed by top-k/top-p/min-p to -inf.

    Matches HF's ``TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper ->
    MinPLogitsWarper`` chain (min_tokens_to_keep=1; top_k=0 / top_p=1 / min_p=0 disable
    their filter per row). One ascending sort serves all three filters for the whole
    batch; every temperature must be > 0.
    """
    dev = logits.device
    v = logits.shape[1]
    temp = _row_params(temperature, torch.float32)
    k = _row_params(top_k, torch.long)
    p = _row_params(top_p, torch.float64)
    mp = _row_params(min_p, torch.float32)
    logits = logits / temp.to(dev)[:, None]

    k_on = (k > 0) & (k < v)
    p_on = p < 1.0
    mp_on = mp > 0
    if not bool(k_on.any() or p_on.any() or mp_on.any()):
        return logits

    neg_inf = float("-inf")
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    if bool(k_on.any()):
        k_eff = torch.where(k_on, k, torch.full_like(k, v))
        # HF keeps every token whose logit ties the k-th largest value.
        kth = sorted_logits.gather(1, (v - k_eff).to(dev)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
    if bool(p_on.any()):
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # HF compares against the Python double (1 - top_p) cast to fp32, not 1 - fp32(top_p).
        remove = cum <= (1.0 - p).to(torch.float32).to(dev)[:, None]
        remove[:, -1] = False
        remove &= p_on.to(dev)[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, neg_inf)
    if bool(mp_on.any()):
        probs = sorted_logits.softmax(dim=-1)
        top = probs.amax(dim=-1, keepdim=True)
        remove = probs < mp.to(dev)[:, None] * top
        sorted_logits = sorted_logits.masked_fill(remove, neg_inf)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def _exponential_race(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Sample one token per row as ``argmax(probs / E)``, ``E ~ Exponential(1)`` i.i.d.

    Equivalent to multinomial sampling, but each row's noise comes from that row's own
    generator (or the global RNG when it has none), so a seeded row is reproducible
    regardless of the other rows in the batch.
    """
    q = torch.empty_like(probs)
    if all(g is None for g in generators):
        q.exponential_()
    else:
        for i, g in enumerate(generators):
            if g is None:
                q[i].exponential_()
            else:
                q[i].exponential_(generator=g)
    # exponential_ may return exactly 0; keep 0/0 from producing NaN (which argmax picks).
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return argmax_rows(probs / q)


def _sample_streams(
    logits: torch.Tensor, configs: Sequence[SamplingConfig], streams: Sequence[tuple[int, int]], want_masked: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampled rows through the fused sampler (the kernel on a GPU, its torch twin elsewhere): the tokens, and
    the tempered logits with removed tokens at -inf when ``want_masked`` (for ``return_logprobs``)."""
    prm = pack_params([param_row(c.temperature, c.top_k, c.top_p, c.min_p, seed) for c, (seed, _) in
                       zip(configs, streams)], [step for _, step in streams])
    tokens = fused_sample_rows(logits, prm)
    if not want_masked:
        return tokens, None
    temp = torch.tensor([c.temperature for c in configs], dtype=torch.float32)
    kept = reference_kept(logits, temp, torch.tensor([c.top_k for c in configs]),
                          torch.tensor([c.top_p for c in configs], dtype=torch.float32),
                          torch.tensor([c.min_p for c in configs], dtype=torch.float32))
    scaled = logits / temp.to(logits.device)[:, None]
    return tokens, scaled.masked_fill(~kept, float("-inf"))


class Sampler:
    """Batched, vectorized next-token selection for a mixed batch of requests."""

    def sample(
        self,
        logits: torch.Tensor,
        configs: Sequence[SamplingConfig],
        token_ids: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        generators: Sequence[torch.Generator | None] | None = None,
        return_logprobs: bool = True,
        suppress_ids: Sequence[Collection[int] | None] | None = None,
        want_logprobs: Sequence[int | None] | None = None,
        isolate_errors: bool = False,
        streams: Sequence[tuple[int, int]] | None = None,
    ) -> SampleOutput:
        """Pick one token per row of ``logits`` [B, V].

        ``token_ids[i]`` is request i's prompt followed by its generated tokens and
        ``prompt_lens[i]`` the prompt part's length. ``generators[i]`` (see
        :func:`make_generator`) supplies row i's randomness; None uses the global RNG.
        ``suppress_ids[i]``: token ids banned in row i (min_tokens: EOS and stop ids).
        ``want_logprobs[i]``: None, or how many top logprobs row i wants (0: the sampled token's only).
        ``isolate_errors``: user processors fail only their rows (``SampleOutput.errors``) instead of raising.
        ``streams[i]``: ``(seed, generated-token index)`` of row i: sampled rows then draw from that Philox
        stream with the fused kernel's kept set (module docstring) and ``generators`` is ignored.
        Configs are assumed validated (``SamplingConfig.validate``) when the request was
        admitted; the sampler does not re-check them every step.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        b = logits.shape[0]
        if generators is None:
            generators = [None] * b
        if not (len(configs) == len(token_ids) == len(prompt_lens) == len(generators) == b) or (
                streams is not None and len(streams) != b):
            raise ValueError(
                f"batch mismatch: logits has {b} rows, configs {len(configs)}, token_ids {len(token_ids)}, "
                f"prompt_lens {len(prompt_lens)}, generators {len(generators)}"
                + ("" if streams is None else f", streams {len(streams)}")
            )
        # A private fp32 copy: processors may edit in place without touching the caller's tensor.
        logits = logits.to(torch.float32, copy=True)
        errors: dict[int, str] = {}

        if any(c.logits_processors for c in configs):
            logits = apply_logits_processors(logits, configs, token_ids, errors if isolate_errors else None)
            if errors:  # failed rows: neutral logits so the batched math below stays finite
                logits[torch.tensor(sorted(errors), device=logits.device)] = 0.0
        if any(c.needs_penalties for c in configs):
            logits = apply_penalties(
                logits,
                token_ids,
                prompt_lens,
                [c.repetition_penalty for c in configs],
                [c.presence_penalty for c in configs],
                [c.frequency_penalty for c in configs],
            )
        if suppress_ids is not None and any(suppress_ids):
            rows, cols = [], []
            for i, ids in enumerate(suppress_ids):
                for t in ids or ():
                    rows.append(i)
                    cols.append(int(t))
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")

        out = SampleOutput(tokens=logits.new_empty(0, dtype=torch.long), errors=errors)
        if want_logprobs is not None and any(n is not None for n in want_logprobs):
            out.logprob_rows = [i for i, n in enumerate(want_logprobs) if n is not None]
            sub = logits if len(out.logprob_rows) == b else \
                logits[torch.tensor(out.logprob_rows, device=logits.device)]
            processed_lp = torch.log_softmax(sub, dim=-1)
            k = max(want_logprobs[i] for i in out.logprob_rows)
            if k:
                out.top_logprobs, out.top_ids = processed_lp.topk(min(k, processed_lp.shape[1]), dim=-1)
        else:
            processed_lp = None

        sample_rows = [i for i, c in enumerate(configs) if not c.is_greedy]
        if not sample_rows:
            # Fast path: nothing random in the batch.
            tokens, final = argmax_rows(logits), logits
        else:
            sub_cfg = [configs[i] for i in sample_rows]
            all_rows = len(sample_rows) == b
            idx = None if all_rows else torch.tensor(sample_rows, device=logits.device)
            sub = logits if all_rows else logits[idx]
            if streams is not None:
                chosen, masked = _sample_streams(sub, sub_cfg, [streams[i] for i in sample_rows], return_logprobs)
            else:
                masked = apply_sampling_masks(
                    sub,
                    [c.temperature for c in sub_cfg],
                    [c.top_k for c in sub_cfg],
                    [c.top_p for c in sub_cfg],
                    [c.min_p for c in sub_cfg],
                )
                chosen = _exponential_race(masked.softmax(dim=-1), [generators[i] for i in sample_rows])
            if all_rows:
                tokens, final = chosen, masked
            else:
                tokens = argmax_rows(logits)  # greedy rows use the penalized, untempered logits
                tokens[idx] = chosen
                final = None
                if masked is not None:
                    final = logits.clone()
                    final[idx] = masked
        out.tokens = tokens
        if processed_lp is not None:
            picked = tokens if len(out.logprob_rows) == b else \
                tokens[torch.tensor(out.logprob_rows, device=tokens.device)]
            out.token_logprobs = processed_lp.gather(1, picked[:, None]).squeeze(1)
        if return_logprobs:
            out.logprobs = torch.log_softmax(final, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        return out


def build_stopping_criteria(
    config: SamplingConfig,
    eos_token_ids: Sequence[int] = (),
    prompt_len: int = 0,
    detokenize: Callable[[list[int]], str] | None = None,
) -> list[StoppingCriteria]:
    """The stop checks for one request: EOS (unless ``ignore_eos``), stop ids/strings, user criteria.

    ``max_new_tokens`` is left to the engine, which counts tokens anyway.
    """
    out: list[StoppingCriteria] = []
    ids = set(config.stop_token_ids)
    if not config.ignore_eos:
        ids.update(int(t) for t in eos_token_ids)
    if ids:
        out.append(StopOnTokens(ids))
    if config.stop_strings:
        if detokenize is None:
            raise SamplingConfigError("SamplingConfig.stop_strings needs a detokenize function (no tokenizer given)")
        out.append(StopOnStrings(config.stop_strings, detokenize, prompt_len=prompt_len))
    out.extend(config.stopping_criteria)
    return out
