"""Triton gated activation ``act(gate) * up`` vs PyTorch in the input dtype, on strided halves of a fused
gate/up output (CPU interpreter; compiled kernels on a GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from autodeploy.backends.triton.kernels.gated_act import gated_act  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
REF = {"silu": torch.nn.functional.silu,
       "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 5, 96), (3, 1100), (2, 3, 4, 40)])
def test_gated_act_matches_torch(dtype, act, shape):
    g = torch.Generator().manual_seed(hash((str(dtype), act, shape)) % 1000)
    n = shape[-1]
    fused = (torch.randn(*shape[:-1], 2 * n, generator=g) * 3).to(dtype).to(DEV)
    gate, up = fused.split([n, n], dim=-1)  # strided views, as after the gate/up GEMM fusion
    out = gated_act(gate, up, act)
    # activation in fp32 rounded to the dtype, product in fp32 rounded once (what PyTorch's kernels do)
    ref = (REF[act](gate.cpu().float()).to(dtype).float() * up.cpu().float()).to(dtype)
    assert out.shape == ref.shape and out.is_contiguous()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    if dtype != torch.float32:  # activation rounded to the dtype before the product, like torch
        # (below 1e-3 torch's 0.5*x*(1+tanh) cancels to 0 where the kernel's x*sigmoid(2u) keeps the value)
        big = ref.float().abs() > 1e-3
        assert (out.cpu()[big] == ref[big]).float().mean() > 0.95


def test_gated_act_rejects_mismatch():
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="must match"):
        gated_act(a, torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown activation"):
        gated_act(a, a, "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m,n,k,bias,gate_first", [(1, 37, 100, True, True), (1, 64, 2048, False, False),
                                                   (3, 10, 300, False, True)])
def test_gemv_gated_epilogue_equals_gemv_then_gated_act(dtype, act, m, n, k, bias, gate_first):
    """The skinny GEMM's gated epilogue gives bit for bit what the unfused GEMM + gated-activation kernel give
    (same per-row reduction order, same two roundings), for either half order, odd widths and several rows."""
    from autodeploy.backends.triton.kernels.gemv import gemv

    g = torch.Generator().manual_seed(m * 100 + n + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(2 * n, k, generator=g) / k**0.5 * 3).to(dtype).to(DEV)
    b = torch.randn(2 * n, generator=g).to(dtype).to(DEV) if bias else None
    fused = gemv(x, w, b, gated=act, gate_first=gate_first)
    y = gemv(x, w, b)
    gate, up = (y[:, :n], y[:, n:]) if gate_first else (y[:, n:], y[:, :n])
    assert fused.shape == (m, n) and torch.equal(fused, gated_act(gate, up, act))
    ref = REF[act](gate.cpu().float()).to(dtype).float() * up.cpu().float()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(fused.cpu().float(), ref, atol=tol, rtol=tol)


def test_linear_gated_act_op_dispatch():
    """One row: the gated epilogue; several rows: F.linear + the gated-activation kernel. Both equal the plain
    composition; an odd row count or unknown activation is refused."""
    from autodeploy.backends.triton import ops  # noqa: F401
    from autodeploy.backends.triton.kernels.gemv import gemv

    op = torch.ops.autodeploy.triton_linear_gated_act
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 40, generator=g).to(DEV)
    for rows in (1, 5):
        x = torch.randn(rows, 40, generator=g).to(DEV)
        y = torch.nn.functional.linear(x, w)
        want = gated_act(y[:, 24:], y[:, :24], "silu")
        torch.testing.assert_close(op(x, w, None, "silu", False), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even number of rows"):
        gemv(torch.randn(1, 40).to(DEV), torch.randn(47, 40).to(DEV), gated="silu")
    with pytest.raises(ValueError, match="activation"):
        gemv(torch.randn(1, 40).to(DEV), w, gated="relu")
