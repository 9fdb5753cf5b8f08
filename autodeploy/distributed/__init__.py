"""Tensor parallelism at run time: start the ranks (spawned workers or torchrun), route each step to them.

The graph side is the ``shard_tensor_parallel`` pass (passes/); this package owns the processes: which rank
this process is (``rank``), and rank 0's handle that sends every step to the workers (``group``). It sits at
the passes/backends/models level: it imports nothing above ``errors``; ``compile`` hands it a ``build``
callable instead of being imported by it."""

from autodeploy.distributed.group import TensorParallelGroup, finish, launch, serve
from autodeploy.distributed.rank import (
    DistributedError, RankInfo, WorkerDiedError, backend_for, current, resolve, torchrun_env,
)

__all__ = ["DistributedError", "RankInfo", "TensorParallelGroup", "WorkerDiedError", "backend_for", "current",
           "finish", "launch", "resolve", "serve", "torchrun_env"]
