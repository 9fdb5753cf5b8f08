"""The compiler stage: pipeline, typed compile context, pass manager, report and compile cache."""

from autodeploy.compiler.driver import compile

__all__ = ["compile"]
