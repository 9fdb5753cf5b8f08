"""The chunked greedy argmax equals ``torch.argmax`` exactly: ties, NaN, -inf, chunk boundaries, strided rows
(CPU interpreter; compiled kernels on a GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import autodeploy.backends.triton.kernels.argmax as am  # noqa: E402
from autodeploy.backends.triton.kernels.argmax import argmax_rows, chunked_argmax  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _check(x: torch.Tensor) -> None:
    got = chunked_argmax(x)
    want = x.cpu().float().argmax(dim=-1)
    assert got.dtype == torch.int64 and got.device == x.device
    assert torch.equal(got.cpu(), want), (got.cpu().tolist(), want.tolist())


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 so a few hundred elements cross several chunk boundaries (fast under the interpreter)."""
    monkeypatch.setattr(am, "_CHUNK", 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_argmax_random_rows(small_chunks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b, v = [(1, 1000), (5, 257), (3, 64)][seed]
    _check((torch.randn(b, v, generator=g) * 4).to(dtype).to(DEV))


def test_argmax_ties_pick_the_lowest_index_across_chunks(small_chunks):
    x = torch.zeros(4, 300)
    x[0, [70, 130, 299]] = 5.0  # the same maximum in three chunks: the first chunk's wins
    x[1, [63, 64]] = 2.0  # the last element of a chunk and the first of the next
    x[2, :] = -1.0  # every element ties
    x[3, 299] = 1.0  # the last element, in a partial chunk
    _check(x.to(torch.bfloat16).to(DEV))


def test_argmax_nan_and_infinities(small_chunks):
    x = torch.randn(5, 200)
    x[0, 150] = float("nan")  # NaN beats every number
    x[0, 10] = float("inf")
    x[1, [90, 20]] = float("nan")  # the lowest NaN
    x[2, :] = float("-inf")  # nothing finite: index 0
    x[3, 199] = float("inf")
    x[4, [5, 180]] = float("inf")
    _check(x.to(DEV))
    # the big-chunk production configuration on one row as well
    monkey = am._CHUNK
    am._CHUNK = 4096
    try:
        _check(x[:1].to(DEV))
    finally:
        am._CHUNK = monkey


def test_argmax_strided_rows_and_empty_batch(small_chunks):
    base = torch.randn(3, 400).to(DEV)
    _check(base[:, :300])  # row stride 400, unit last stride
    _check(base.t().contiguous().t()[:, :100])  # a column-major view: copied first
    assert chunked_argmax(base[:0]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        argmax_rows(base[0])
    if DEV == "cuda":  # the dispatcher picks the kernels for CUDA logits
        assert torch.equal(argmax_rows(base), chunked_argmax(base))


def test_argmax_also_writes_the_host_copy(small_chunks):
    x = torch.randn(3, 500).to(DEV)
    host = torch.full((3,), -1, dtype=torch.int64)
    if DEV == "cuda":
        host = host.pin_memory()
    got = chunked_argmax(x, host_out=host)
    if DEV == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(host, x.cpu().argmax(-1)) and torch.equal(got.cpu(), host)
    with pytest.raises(ValueError, match="host_out must be a contiguous torch.int64"):
        chunked_argmax(x, host_out=torch.empty(2, dtype=torch.int64))
    # the torch fallback fills it too
    host2 = torch.full((3,), -1, dtype=torch.int64)
    argmax_rows(x.cpu(), host_out=host2)
    assert torch.equal(host2, host)


def test_argmax_row_sums_ride_along(small_chunks):
    """The finiteness check's row sums come out of the same pass, NaN/inf included, on both paths."""
    x = torch.randn(4, 700).to(DEV)
    x[1, 333] = float("nan")
    x[2, 5] = float("inf")
    sums = torch.full((4,), -1.0)
    if DEV == "cuda":
        sums = sums.pin_memory()
    got = chunked_argmax(x, row_sums=sums)
    if DEV == "cuda":
        torch.cuda.synchronize()
    ref = torch.sum(x.cpu(), dim=-1, dtype=torch.float32)
    assert torch.equal(got.cpu(), x.cpu().argmax(-1))
    assert torch.isnan(sums[1]) and sums[2] == float("inf")
    torch.testing.assert_close(sums[[0, 3]], ref[[0, 3]], rtol=1e-5, atol=1e-4)
    cpu_sums = torch.full((4,), -1.0)
    argmax_rows(x.cpu(), row_sums=cpu_sums)
    torch.testing.assert_close(cpu_sums, ref, equal_nan=True)
    with pytest.raises(ValueError, match="row_sums must be"):
        chunked_argmax(x, row_sums=torch.empty(4, dtype=torch.float64))
