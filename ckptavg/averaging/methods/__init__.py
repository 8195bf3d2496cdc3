"""The averaging methods: one file per method, and the registry that lists them.

``METHODS`` is a plain dict from name to class, filled here explicitly (no
registration by import side effect). A plug-in method is one new file with a
:class:`~ckptavg.averaging.methods.base.Method` subclass, added here (or, for
code outside ckptavg, with :func:`register`): its ``ckptavg average`` and
``ckptavg watch`` flags, its TOML keys, their validation and its row in the
README's method table all follow from the class's declaration.
"""

from __future__ import annotations

from typing import Any

from ckptavg.averaging.methods.base import FoldInfo, Method, Option, Plan, Slot, divide, finite
from ckptavg.averaging.methods.ema import EMA
from ckptavg.averaging.methods.latest import Latest
from ckptavg.averaging.methods.lawa import LAWA
from ckptavg.averaging.methods.power_ema import PowerEMA
from ckptavg.averaging.methods.swa import SWA
from ckptavg.averaging.methods.uniform import Uniform
from ckptavg.errors import UsageError

__all__ = ["EMA", "LAWA", "METHODS", "SWA", "FoldInfo", "Latest", "Method", "Option", "Plan", "PowerEMA", "Slot",
           "Uniform", "cli_params", "divide", "finite", "make_method", "method_class", "methods_table", "register",
           "unregister"]

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Uniform, EMA, LAWA, SWA, PowerEMA)}


def register(cls: type[Method], *, replace: bool = False) -> type[Method]:
    """Add a method class to the registry (checks its declaration); returns it, so it can decorate."""
    name = getattr(cls, "name", None)
    if (not isinstance(name, str) or not name.replace("-", "_").isidentifier() or name != name.lower()
            or name.startswith("-") or name.endswith("-") or "--" in name):
        raise UsageError(f"method class {cls.__qualname__} needs a lower-case name of words joined by single "
                         f"hyphens (like power-ema), got {name!r}")
    if name in METHODS and METHODS[name] is not cls and not replace:
        raise UsageError(f"a method named {name!r} is already registered ({METHODS[name].__qualname__})")
    declared = {p.name for p in cls.params}
    if cls.main_option is not None and cls.main_option not in declared:
        raise UsageError(f"method {name}: main_option {cls.main_option!r} is not one of its params")
    for group in cls.one_of:
        if not set(group) <= declared:
            raise UsageError(f"method {name}: one_of names options it does not declare: {group}")
    taken = {p.name: (m, p) for m in METHODS.values() if m is not cls for p in m.params if p.cli}
    for p in cls.params:
        if p.cli and p.name in taken and taken[p.name][1].kind is not p.kind:
            other = taken[p.name][0].name
            raise UsageError(f"method {name}: option {p.name} ({p.kind.__name__}) clashes with method {other}'s "
                             f"option of the same name ({taken[p.name][1].kind.__name__}); both are {p.flag}")
    METHODS[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method added with :func:`register`."""
    METHODS.pop(name, None)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; unknown names list the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def make_method(name: str, **options: Any) -> Method:
    """Build a method by registry name; unknown names list the valid ones."""
    return method_class(name)(**options)


def cli_params() -> list[Option]:
    """Every registered method's command-line options, once each (methods may share an option)."""
    seen: dict[str, Option] = {}
    for cls in METHODS.values():
        for p in cls.params:
            if p.cli:
                seen.setdefault(p.name, p)
    return list(seen.values())


def methods_table() -> str:
    """The README's method table (markdown), from the registry's declarations."""
    rows = ["| method | what it averages | options | reference |", "|---|---|---|---|"]
    for cls in METHODS.values():
        opts = []
        for p in cls.params:
            text = f"`{p.name}`" + (f" ({p.unit})" if p.unit else "")
            if p.default is not None and p.cli:
                text += f", default {p.default}"
            if p.name == cls.main_option:
                text += f"; inline `{cls.name}:{p.metavar}`"
            opts.append(text)
        rows.append(f"| `{cls.name}` | {cls.summary} | {'; '.join(opts) or '-'} | {cls.reference} |")
    return "\n".join(rows)
