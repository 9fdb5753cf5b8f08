"""Canonical quantized linears (torch.library ops with fake impls) and the weight quantizers behind them.

Three ops, one per scheme; each has a plain-torch reference that runs anywhere (CPU CI), and may have device
fast paths registered in ``FAST_PATHS`` (the first whose checker accepts the call wins, as Thunder's
executors; e.g. ``torch._scaled_mm`` on CUDA with compute capability >= 8.9). A fast path must compute the
same quantized math as the reference: it may only differ in float rounding.

- ``autodeploy::fp8_linear(x, weight, weight_scale, input_scale, bias)``: W8A8 in float8 E4M3. ``weight`` is
  ``[N, K]`` float8_e4m3fn, ``weight_scale`` fp32 ``[N]`` (per output channel) or ``[]`` (per tensor).
  ``input_scale`` None: dynamic per-token activation scales (absmax of each row / 448); a ``[]`` tensor: one
  static activation scale (as calibrated checkpoints store it).
- ``autodeploy::int8_linear(x, weight, weight_scale, smooth, bias)``: W8A8 int8 with dynamic per-token
  activation scales and an optional SmoothQuant per-input-channel divisor ``smooth`` ``[K]`` (the weight was
  multiplied by it before quantization, so ``(x / s) @ (W * s)^T == x @ W^T`` before rounding).
- ``autodeploy::int8_weight_linear(x, weight, weight_scale, bias)``: weight-only int8, dequantized inside the
  GEMM (activations stay in the model dtype; batch-1 decode reads half the bf16 weight bytes).

The output has ``x``'s dtype; accumulation is fp32 (int32 for int8 x int8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0
_EPS = 1e-12  # floor of a scale: an all-zero row/channel quantizes to zeros instead of NaN
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: float8 tensor cores (torch._scaled_mm)
# Attribute a pre-quantized checkpoint loader sets on the model it builds: {"format", "mode", ...}.
PREQUANTIZED_ATTR = "_autodeploy_prequantized"


# ---------------------------------------------------------------------------------------------- quantizers
def _channel_absmax(w: Tensor) -> Tensor:
    return w.detach().float().abs().amax(dim=-1).clamp(min=_EPS)


FP8_SCALE_SEARCH = 16  # per-channel candidate scales per octave (1 = plain absmax / 448)


@torch.no_grad()
def quantize_fp8_weight(w: Tensor, per_channel: bool = True, search: int = FP8_SCALE_SEARCH) -> tuple[Tensor, Tensor]:
    """``w [N, K]`` -> (float8_e4m3fn ``[N, K]``, fp32 scale ``[N]`` or ``[]``) with ``w ~= q * scale``.

    Per channel, the scale is ``absmax * c / 448`` with ``c`` the one of ``2^(j / search)``, ``j < search``, that
    gives the least squared error: float8's grid is relative, so moving the scale within one octave (never
    clipping: ``c >= 1``) realigns the grid with the weights; on SmolLM2 this cuts the weight error by ~13%."""
    w32 = w.detach().float()
    if not per_channel:
        scale = w32.abs().amax().clamp(min=_EPS) / FP8_MAX
        return (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    base = _channel_absmax(w32) / FP8_MAX
    best_scale, best_err = base, None
    for j in range(max(1, search)):
        scale = base * 2.0 ** (j / max(1, search))
        q = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        err = (q.float() * scale[:, None] - w32).pow(2).sum(dim=1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return (w32 / best_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), best_scale


@torch.no_grad()
def quantize_int8_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w [N, K]`` -> (int8 ``[N, K]``, fp32 per-channel scale ``[N]``), symmetric, range [-127, 127]."""
    w32 = w.detach().float()
    scale = _channel_absmax(w32) / INT8_MAX
    q = torch.round(w32 / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


@torch.no_grad()
def smoothing_factors(act_absmax: Tensor, w: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``w [N, K]``): dividing
    activations by ``s`` and multiplying weights by it moves outliers from activations into weights."""
    a = act_absmax.detach().float().to(w.device).clamp(min=1e-5)
    wmax = w.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    return (a.pow(alpha) / wmax.pow(1.0 - alpha)).clamp(min=1e-5)


def quantize_fp8_activation(x: Tensor, input_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``x [..., K]`` -> (float8 values, fp32 scale ``[..., 1]`` per token, or the static ``[]`` scale)."""
    x32 = x.float()
    # true divisions on every device: the divisor is a tensor filled on x's device (capture-safe), since torch on
    # CUDA multiplies by the reciprocal of a Python-number divisor. The fused Triton kernels multiply by
    # reciprocals, so they agree with this up to float rounding (quant_gemm.py).
    scale = (x32.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / x32.new_full((), FP8_MAX) if input_scale is None
             else input_scale.float())
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_int8_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., K]`` -> (int8 values, fp32 per-token scale ``[..., 1]``)."""
    x32 = x.float()
    # a tensor divisor, so the division is a true one on CUDA too (as in quantize_fp8_activation)
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / x32.new_full((), INT8_MAX)
    return torch.round(x32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


# ---------------------------------------------------------------------------------------------- references
def _finish(acc: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)


def fp8_linear_reference(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None) -> Tensor:
    xq, xs = quantize_fp8_activation(x, input_scale)
    return fp8_prequantized_reference(xq, xs, weight, weight_scale, bias, x.dtype)


def fp8_prequantized_reference(xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor,
                               bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``fp8_linear`` after its activation quantization: ``xq`` float8 with scales ``x_scale`` (``[..., 1]`` per
    token, or ``[]``)."""
    acc = torch.matmul(xq.float(), weight.float().t())  # exact products of fp8 values, fp32 sums
    return _finish(acc * x_scale.float() * weight_scale.float(), bias, out_dtype)


def _int_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """int8 ``a [..., K]`` x int8 ``b_t [N, K]``^T -> int32 (exact)."""
    a2 = a.reshape(-1, a.shape[-1])
    m = a2.shape[0]
    # CUDA _int_mm (cuBLASLt) needs M > 16, K and N multiples of 8 and 16-byte aligned rows (K % 16: the padded
    # copy below is contiguous)
    cublas = (a2.shape[1] % 16 == 0 and b_t.shape[0] % 8 == 0 and b_t.stride(1) == 1 and b_t.stride(0) % 16 == 0
              and b_t.data_ptr() % 16 == 0)
    if a2.device.type == "cpu" or (m > 16 and cublas and a2.data_ptr() % 16 == 0 and a2.stride(0) % 16 == 0):
        out = torch._int_mm(a2, b_t.t())
    elif 0 < m <= 16 and cublas:  # few rows: padded with zero rows to 17 (a new, aligned tensor)
        out = torch._int_mm(torch.cat([a2, a2.new_zeros(17 - m, a2.shape[1])]), b_t.t())[:m]
    else:  # other shapes on CUDA: float64 sums of int8 products are exact
        out = torch.matmul(a2.double(), b_t.double().t()).to(torch.int32)
    return out.reshape(*a.shape[:-1], b_t.shape[0])


def int8_linear_reference(x: Tensor, weight: Tensor, weight_scale: Tensor, smooth: Optional[Tensor] = None,
                          bias: Optional[Tensor] = None) -> Tensor:
    xs_in = x.float() if smooth is None else x.float() / smooth.float()
    xq, xs = quantize_int8_activation(xs_in)
    acc = _int_matmul(xq, weight).float()
    return _finish(acc * xs * weight_scale.float(), bias, x.dtype)


def int8_weight_linear_reference(x: Tensor, weight: Tensor, weight_scale: Tensor,
                                 bias: Optional[Tensor] = None) -> Tensor:
    acc = torch.matmul(x.float(), weight.float().t())  # int8 values are exact in fp32
    return _finish(acc * weight_scale.float(), bias, x.dtype)


# ---------------------------------------------------------------------------------------------- fast paths
def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """CUDA compute capability of ``device``; None off CUDA (where the reference kernels run)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def fp8_support(device: torch.device) -> tuple[bool, str]:
    """Whether FP8 linears can run on ``device``: CPU emulates them (reference); CUDA needs capability >= 8.9."""
    cap = device_capability(device)
    if cap is None:
        return True, f"{torch.device(device).type}: reference kernels (float8 emulated in fp32)"
    if cap < FP8_MIN_CAPABILITY:
        return False, (f"FP8 needs compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                       f"(Ada/Hopper); {torch.device(device)} has {cap[0]}.{cap[1]}")
    return True, f"compute capability {cap[0]}.{cap[1]}: torch._scaled_mm"


@dataclass(frozen=True)
class FastPath:
    """A device kernel for one op: used when ``accepts(*args)`` says so, else the next one (then the reference)."""

    name: str
    accepts: Callable[..., bool]
    fn: Callable[..., Tensor]


FAST_PATHS: dict[str, list[FastPath]] = {"fp8_linear": [], "int8_linear": [], "int8_weight_linear": []}


def register_fast_path(op: str, path: FastPath) -> None:
    """Add a kernel for ``op`` (``fp8_linear``, ``int8_linear``, ``int8_weight_linear``), tried in order."""
    FAST_PATHS[op].append(path)


def _dispatch(op: str, reference: Callable[..., Tensor], *args: Optional[Tensor]) -> Tensor:
    for path in FAST_PATHS[op]:
        if path.accepts(*args):
            return path.fn(*args)
    return reference(*args)


def _scaled_mm_accepts(x, weight, weight_scale, input_scale=None, bias=None) -> bool:
    cap = device_capability(x.device)
    return (cap is not None and cap >= FP8_MIN_CAPABILITY and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def scaled_mm_fp8(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None,
                  quantize: Callable[..., tuple[Tensor, Tensor]] = quantize_fp8_activation) -> Tensor:
    """cuBLASLt FP8 GEMM with row-wise scales (per-token activations x per-channel weights). ``quantize``: the
    activation quantizer (a backend may pass a fused kernel computing ``quantize_fp8_activation``'s math)."""
    xq, xs = quantize(x.reshape(-1, x.shape[-1]), input_scale)
    return scaled_mm_prequantized(xq, xs, weight, weight_scale, bias, x.dtype).reshape(*x.shape[:-1], -1)


def scaled_mm_prequantized(xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor,
                           bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``torch._scaled_mm`` on float8 activations ``xq [..., K]`` with their per-token (or static) scales."""
    x2 = xq.reshape(-1, xq.shape[-1])
    n = weight.shape[0]
    scale_a = x_scale.float().reshape(-1, 1).expand(x2.shape[0], 1).contiguous()
    scale_b = weight_scale.float().reshape(-1).expand(n).reshape(1, n).contiguous()
    mm_dtype = torch.bfloat16  # what row-wise scaling supports on every torch version; cast after
    out = torch._scaled_mm(x2, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=mm_dtype,
                           bias=bias.to(mm_dtype) if bias is not None else None)
    return out.to(out_dtype).reshape(*xq.shape[:-1], n)


def scaled_mm_accepts_prequantized(xq: Tensor, weight: Tensor) -> bool:
    cap = device_capability(xq.device)
    return cap is not None and cap >= FP8_MIN_CAPABILITY and xq.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0


register_fast_path("fp8_linear", FastPath("torch._scaled_mm", _scaled_mm_accepts, scaled_mm_fp8))


def _dequant_gemm(x, weight, weight_scale, bias=None) -> Tensor:
    """cuBLAS in the model dtype on the int8 weight cast to it (int8 values are exact in bf16/fp16), then the
    per-channel scale: prefill-sized weight-only GEMMs on CUDA (decode rows go to the Triton kernel)."""
    out = torch.nn.functional.linear(x, weight.to(x.dtype)) * weight_scale.to(x.dtype)
    return out + bias.to(x.dtype) if bias is not None else out


register_fast_path("int8_weight_linear", FastPath("dequantize + cuBLAS", lambda x, *a: x.is_cuda, _dequant_gemm))


# ---------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("autodeploy::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor] = None,
               bias: Optional[Tensor] = None) -> Tensor:
    return _dispatch("fp8_linear", fp8_linear_reference, x, weight, weight_scale, input_scale, bias)


@torch.library.custom_op("autodeploy::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, smooth: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
    return _dispatch("int8_linear", int8_linear_reference, x, weight, weight_scale, smooth, bias)


@torch.library.custom_op("autodeploy::int8_weight_linear", mutates_args=())
def int8_weight_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return _dispatch("int8_weight_linear", int8_weight_linear_reference, x, weight, weight_scale, bias)


def _linear_fake(x, weight, *rest):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


fp8_linear.register_fake(_linear_fake)
int8_linear.register_fake(_linear_fake)
int8_weight_linear.register_fake(_linear_fake)

QUANT_LINEAR_OPS = (torch.ops.autodeploy.fp8_linear.default, torch.ops.autodeploy.int8_linear.default,
                    torch.ops.autodeploy.int8_weight_linear.default)


def is_quantized_linear(node) -> bool:
    """True for an FX node calling one of the quantized-linear ops."""
    return getattr(node, "op", None) == "call_function" and node.target in QUANT_LINEAR_OPS
