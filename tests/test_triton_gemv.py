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


def test_pdl_selection(monkeypatch):
    """AUTODEPLOY_PDL picks the kernel kinds that launch with PDL; never off a Hopper GPU or in the interpreter."""
    from autodeploy.backends.triton.kernels import pdl

    for env, kind, want in [("0", "gemv", False), ("1", "gemv", True), ("norm,act", "act", True),
                            ("norm,act", "gemv", False)]:
        monkeypatch.setenv("AUTODEPLOY_PDL", env)
        assert pdl._selected(kind) is want
    monkeypatch.setenv("AUTODEPLOY_PDL", "1")
    assert pdl.pdl_enabled(torch.device("cpu"), "gemv") is False


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA with compiled Triton kernels")
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_gemv_pdl_chain_in_cuda_graph(mode):
    """A chain of dependent batch-1 GEMVs launched with PDL (each prefetches its weight before waiting on the
    GEMV that produced its input), captured in a CUDA graph and replayed on fresh inputs, equals the eager chain
    without PDL bit for bit. A missing or misplaced wait would read a half-written input."""
    from autodeploy.backends.triton.kernels.pdl import pdl_enabled

    if not pdl_enabled(torch.device("cuda"), "gemv"):
        pytest.skip("PDL needs a Hopper-or-newer GPU")
    g = torch.Generator(device="cuda").manual_seed(mode)
    dims = [2048, 3072, 2048, 8192, 2048, 16384, 2048]
    ws = [torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5
          for k, n in zip(dims[:-1], dims[1:])]
    x0 = torch.empty(1, dims[0], device="cuda", dtype=torch.bfloat16)

    def chain(pdl):
        x = x0
        for w in ws * 4:
            x = gemv(x, w, pdl=pdl, pdl_mode=mode)  # each output is the next GEMV's input
        return x

    chain(True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for _ in range(3):
        x0.normal_(generator=g)
        want = chain(False)
        graph.replay()
        assert torch.equal(out, want)
