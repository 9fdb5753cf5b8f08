"""Attention backends. One package per backend; selection is per model (see registry.select_backend)."""

from autodeploy.backends.base import AttentionBackend, AttentionSpec
from autodeploy.backends.registry import get_backend, list_backends, register_backend, select_backend

__all__ = ["AttentionBackend", "AttentionSpec", "get_backend", "list_backends", "register_backend", "select_backend"]
