"""The one registry of unlearning methods: name → class. A new method is one file and ``@register``."""

from __future__ import annotations

from .base import PD_ON, Method, MethodError

METHODS: dict = {}


def register(cls):
    """Class decorator: add a :class:`Method` subclass under its ``name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **hparams) -> Method:
    """An instance of the method ``name`` with hyper-parameters ``hparams`` (strings are converted)."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))} "
                          "(see `mlunlearn methods`)")
    cls = METHODS[name]
    known = cls.hyperparameters()
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise MethodError(f"unknown hyper-parameter {', '.join(unknown)} for {name}; "
                          f"it takes: {', '.join(f'{k}={v}' for k, v in known.items())}")
    return cls(**{k: convert(known[k], v, k) for k, v in hparams.items()})


def convert(default, value, key: str = ""):
    """Convert a command-line string to the type of the default (bool, int, float, str; a ``None``
    default stands for an optional number, e.g. SineProject's ``beta``)."""
    if not isinstance(value, str):
        return value
    if key == "pd" and value.strip().lower() in PD_ON:
        return value  # the method turns it into SafeEraser's weight for its objective
    if default is None:
        if value.lower() in ("none", "null"):  # back to the optional setting's default behaviour
            return None
        default = 0.0
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        extra = " or 'on' (SafeEraser's weight for the method)" if key == "pd" else ""
        kind = {"int": "an int (a whole number)"}.get(type(default).__name__, f"a {type(default).__name__}")
        raise MethodError(f"{key}={value!r}: expected {kind}{extra}") from None
    return value


def describe() -> list:
    """``(name, one-line summary)`` of every registered method, sorted by name."""
    return [(n, METHODS[n].summary) for n in sorted(METHODS)]
