"""Exceptions that name the cause. Users see these instead of deep torch stack traces."""


class AutoDeployError(Exception):
    """Base class of every error autodeploy raises on purpose."""


class UnsupportedModelError(AutoDeployError):
    """The model (architecture, attention form, dtype) cannot be compiled."""


class InvalidRequestError(AutoDeployError, ValueError):
    """A generation request is malformed (empty prompt, bad token ids, too long, bad sampling values)."""


class SamplingConfigError(InvalidRequestError):
    """A sampling parameter is outside its valid range."""


class ConfigError(AutoDeployError, ValueError):
    """An engine or compile setting is outside its valid range."""


class CacheCapacityError(AutoDeployError):
    """The KV cache cannot hold a request even when it runs alone."""


class BackendUnavailableError(AutoDeployError):
    """The requested backend or lowering cannot run here (missing package or device)."""


class EngineOverloadedError(AutoDeployError):
    """The engine's queue of waiting requests is full (``EngineService(max_waiting=...)``): retry later."""


class EngineClosedError(AutoDeployError):
    """The engine service was shut down (or stopped after a fatal error) and takes no more requests."""


class EngineBusyError(AutoDeployError, RuntimeError):
    """Two threads drove one ``Engine`` at once; an Engine has one owner (use ``EngineService`` to share it)."""
