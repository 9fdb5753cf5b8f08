"""The lowering stage: how a cached graph runs (eager, torch.compile, decode / whole-step / piecewise CUDA
graphs), chosen from a registry."""

from autodeploy.lowering.registry import LOWERINGS, direct_call_module, lower_graph, register_lowering, resolve_lowering

__all__ = ["LOWERINGS", "direct_call_module", "lower_graph", "register_lowering", "resolve_lowering"]
