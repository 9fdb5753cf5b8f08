"""The TensorRT backend. Where ``tensorrt`` does not import (these CPU machines: the registry's package is a stub
without NVIDIA's libraries): asking for it raises BackendUnavailableError with the install hint, ``auto`` skips
it and says why in ``explain()``. Where it imports on a GPU: the plan matches HF like every backend."""


import pytest
import torch

import autodeploy
from autodeploy.backends import get_backend
from autodeploy.backends.tensorrt import tensorrt_import_error
from autodeploy.errors import BackendUnavailableError
from helpers import rel_rms
from model_zoo import make_model

TRT_MISSING = tensorrt_import_error()
needs_trt = pytest.mark.skipif(TRT_MISSING is not None or not torch.cuda.is_available(),
                               reason=TRT_MISSING or "TensorRT needs a CUDA device")


@pytest.mark.skipif(TRT_MISSING is None, reason="tensorrt imports here")
def test_explicit_tensorrt_names_the_missing_install():
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed.*pip install tensorrt"):
        autodeploy.compile(make_model("llama"), backend="tensorrt", max_batch_size=2, max_seq_len=32, page_size=4)


@pytest.mark.skipif(TRT_MISSING is None, reason="tensorrt imports here")
def test_auto_skips_tensorrt_and_says_why():
    cm = autodeploy.compile(make_model("llama"), max_batch_size=2, max_seq_len=32, page_size=4)
    assert cm.report.backend == "torch"
    assert "TensorRT is not installed" in cm.report.rejected_backends["tensorrt"]
    assert "not tensorrt: TensorRT is not installed" in cm.explain()


def test_tensorrt_backend_contract():
    backend = get_backend("tensorrt")
    assert backend.devices == ("cuda",) and backend.engine_lowering == "tensorrt"
    assert backend.capabilities == get_backend("onnxruntime").capabilities
    ok, why = backend.available(torch.device("cpu"), explicit=True)
    assert not ok and why


@pytest.mark.gpu
@needs_trt
def test_tensorrt_plan_matches_hf():
    from autodeploy.metadata import SequenceChunk

    model = make_model("llama").cuda()
    cm = autodeploy.compile(model, backend="tensorrt", max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
    assert cm.report.lowering == "tensorrt"
    seq = list(range(1, 12))
    logits = cm.forward(cm.pack([SequenceChunk(seq, 0, [1, 2, 3])], all_logits=True))
    with torch.no_grad():
        ref = model(torch.tensor([seq], device="cuda")).logits[0]
    assert rel_rms(logits, ref) < 1e-4
