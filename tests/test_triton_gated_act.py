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
