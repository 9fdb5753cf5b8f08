"""Model loading (local checkpoints, named models: the bundled SmolLM2 default and builtin random-weight configs),
support checks, export, and per-family defaults."""

from autodeploy.models.factory import (
    DEFAULT_MODEL, MODEL_SOURCES, ModelInfo, check_supported, export_model, load_model, model_info, model_names,
    register_model_source,
)

__all__ = ["DEFAULT_MODEL", "MODEL_SOURCES", "ModelInfo", "check_supported", "export_model", "load_model",
           "model_info", "model_names", "register_model_source"]
