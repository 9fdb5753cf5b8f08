import os
import sys

# Triton kernels run under the interpreter on machines without a GPU. The flag must be set before anything
# imports triton; GPU runs export TRITON_INTERPRET=0 (benchmarks/run_gpu_checks.sh).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# one intra-op thread per xdist worker (the suite runs `-n 2` on a 2-core CI machine), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (and compiled Triton kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
