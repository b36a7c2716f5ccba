"""Unlearning methods, one file each, registered by name (``mlunlearn methods`` lists them).

Each reads like its equation; the engine (:mod:`mlunlearn.engine`) is the same for all of them.
"""

from .base import Method, MethodError, Reference, trainable_parameter_names
from .registry import METHODS, describe, get_method, register

from . import cagul, ga, graddiff, kl, mmunlearner, npo, nullspace, po, sineproject  # noqa: E402,F401  (registers the methods)

__all__ = ["METHODS", "Method", "MethodError", "Reference", "describe", "get_method", "register",
           "trainable_parameter_names"]
