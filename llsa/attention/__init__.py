"""Attention registry: ``build(name, dim, heads, **options)`` returns an ``nn.Module``.

Every module is called as ``module(q, k, v, x=None)`` with ``q, k, v`` of shape (batch, heads, N, D)
and ``x`` the layer input (batch, N, dim) for methods with a learned gate; it returns (batch, heads, N, D).
A new method plugs in with ``@register("name", OptionsDataclass)`` on its module class.
"""
from llsa.attention.registry import ATTENTIONS, build, options_for, register
from llsa.attention import full as _full  # noqa: F401  (registers "full")
from llsa.attention import llsa as _llsa  # noqa: F401  (registers "llsa")
from llsa.attention import sla as _sla  # noqa: F401  (registers "sla")
from llsa.attention import vsa as _vsa  # noqa: F401  (registers "vsa")

__all__ = ["ATTENTIONS", "build", "options_for", "register"]
