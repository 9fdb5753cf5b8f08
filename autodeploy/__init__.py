"""autodeploy: compile HuggingFace causal LMs into fast paged-KV inference graphs, and serve them.

    import autodeploy
    cm = autodeploy.compile(hf_model, max_batch_size=8, max_seq_len=2048)
    cm.generate([[1, 2, 3]], max_new_tokens=32)
    print(cm.explain())

    llm = autodeploy.LLM(hf_model_or_checkpoint_dir)
    llm.generate(["Hello"], autodeploy.SamplingConfig(temperature=0.8, top_p=0.9))
"""

from __future__ import annotations

__version__ = "0.1.0"

from autodeploy.compiler import compile  # noqa: E402  (the public entry point shadows the builtin on purpose)
from autodeploy.compiler.pipeline import Pipeline  # noqa: E402
from autodeploy.graph.passes import PassResult, register_pass  # noqa: E402
from autodeploy.errors import (  # noqa: E402
    AutoDeployError, BackendUnavailableError, CacheCapacityError, ConfigError, InvalidRequestError,
    SamplingConfigError, UnsupportedModelError,
)
from autodeploy.logging_utils import configure_logging  # noqa: E402
from autodeploy.runtime.hooks import LogitsProcessor, StoppingCriteria  # noqa: E402
from autodeploy.runtime.sampling import SamplingConfig  # noqa: E402
from autodeploy.runtime.scheduler import AdmissionPolicy  # noqa: E402


def __getattr__(name: str):
    if name == "LLM":
        from autodeploy.entrypoints.llm import LLM

        return LLM
    if name == "load":  # a saved engine (CompiledModel.save), without the HF model
        from autodeploy.runtime.engine_dir import load_engine

        return load_engine
    if name == "QuantizationConfig":
        from autodeploy.passes.quantize_linears import QuantizationConfig

        return QuantizationConfig
    if name == "CompiledModel":
        from autodeploy.runtime.compiled_model import CompiledModel

        return CompiledModel
    raise AttributeError(f"module 'autodeploy' has no attribute {name!r}")


__all__ = [
    "compile", "LLM", "CompiledModel", "SamplingConfig", "AdmissionPolicy", "LogitsProcessor", "StoppingCriteria",
    "AutoDeployError", "UnsupportedModelError", "InvalidRequestError", "SamplingConfigError",
    "CacheCapacityError", "BackendUnavailableError", "ConfigError", "configure_logging",
    "Pipeline", "PassResult", "register_pass", "QuantizationConfig", "load",
]
