"""Skinny GEMM (batch-1 decode linears) vs ``F.linear``: odd sizes, bias, all float dtypes; and the op's
dispatch (one row -> the kernel, several -> cuBLAS/ATen). CPU interpreter here, compiled kernels on a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from autodeploy.backends.triton.kernels.gemv import gemv  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 100, True), (1, 64, 2048, False), (2, 130, 1030, True),
                                        (4, 24, 64, False), (1, 8, 3000, True)])
def test_gemv_matches_linear(dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if bias else None
    y = gemv(x.view(1, m, k), w, b)  # leading dims are kept
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).view(1, m, n)
    assert y.shape == (1, m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float().cpu(), ref.cpu(), rtol=TOL[dtype], atol=TOL[dtype])


def test_gemv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.randn(9, 16), torch.randn(8, 16))
    with pytest.raises(ValueError, match="weight must be"):
        gemv(torch.randn(1, 16), torch.randn(8, 15))


def test_triton_linear_dispatch():
    """The op: one row -> the kernel; several rows, or a weight the kernel cannot stream (non-unit last
    stride), -> F.linear. Results equal F.linear either way."""
    from autodeploy.backends.triton import ops  # noqa: F401

    op = torch.ops.autodeploy.triton_linear
    g = torch.Generator().manual_seed(7)
    w = torch.randn(24, 40, generator=g).to(DEV)
    w_t = torch.randn(40, 24, generator=g).to(DEV).t()  # [24, 40] view with stride (1, 24)
    for x in (torch.randn(1, 40, generator=g), torch.randn(3, 40, generator=g)):
        x = x.to(DEV)
        for weight in (w, w_t):
            torch.testing.assert_close(op(x, weight), torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
