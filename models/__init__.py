"""Model factories, export, and per-family defaults."""

from autodeploy.models.factory import ModelInfo, check_supported, export_model, load_model, model_info

__all__ = ["ModelInfo", "check_supported", "export_model", "load_model", "model_info"]
