"""Name -> (module class, typed options) table behind ``llsa.attention.build``."""
import dataclasses
from typing import Any

from torch import nn

ATTENTIONS: dict[str, tuple[type[nn.Module], type]] = {}


def register(name: str, options: type):
    """Class decorator: make ``cls(dim, heads, opts)`` buildable as ``build(name, dim, heads, **opts)``."""

    def wrap(cls):
        if name in ATTENTIONS:
            raise ValueError(f"attention {name!r} is registered twice")
        ATTENTIONS[name] = (cls, options)
        return cls

    return wrap


def options_for(name: str, **options: Any):
    """The validated options dataclass of attention ``name``; unknown keys raise with the valid ones."""
    if name not in ATTENTIONS:
        raise KeyError(f"unknown attention {name!r}; choose one of {sorted(ATTENTIONS)}")
    _, opt_cls = ATTENTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(opt_cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"attention {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return opt_cls(**options)


def build(name: str, dim: int, heads: int, **options: Any) -> nn.Module:
    """Build attention ``name`` for a layer of width ``dim`` split into ``heads`` heads."""
    cls, _ = ATTENTIONS.get(name, (None, None))
    opts = options_for(name, **options)
    if dim % heads:
        raise ValueError(f"attention {name!r}: dim={dim} is not divisible by heads={heads}")
    return cls(dim, heads, opts)
