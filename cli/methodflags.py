"""Command-line flags derived from the method registry (:mod:`ckptavg.averaging.methods`).

A method declares its options once; ``ckptavg average`` gets one flag per option
(``--half-life``, ``--window``...) and ``ckptavg watch`` one repeatable flag per
method (``--ema H``, ``--lawa K``, ``--swa-start S``). The flags are built when
the command runs, so a method registered by a plug-in (or a test) has its flags
without any edit here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from ckptavg.averaging.methods import METHODS, Method, cli_params
from ckptavg.errors import OptionError, UsageError
from ckptavg.oneshot import AverageSpec

__all__ = ["DerivedOptionsCommand", "average_flags", "flag_of", "parse_methods", "phrase", "watch_averages", "watch_flags"]

_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


class DerivedOptionsCommand(click.Command):
    """A click command with extra options computed at run time (``derive()``), listed before ``--help``."""

    def __init__(self, *args: Any, derive: Callable[[], list[click.Option]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.derive = derive

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        own = super().get_params(ctx)
        taken = {opt for p in own for opt in p.opts}
        extra = [p for p in self.derive() if not taken.intersection(p.opts)]
        help_option = self.get_help_option(ctx)
        head = [p for p in own if p is not help_option]
        return [*head, *extra, *([help_option] if help_option is not None else [])]


def flag_of(name: str) -> str:
    """The ``ckptavg average`` flag of a method option (``half_life`` → ``--half-life``)."""
    return "--" + name.replace("_", "-")


def phrase(e: OptionError, method: type[Method] | None = None) -> UsageError:
    """An :class:`OptionError` in command-line terms (flags instead of option names)."""
    return UsageError(e.phrase(flag_of, method_name=f"--method {method.name}" if method else None))


def _dest(cls: type[Method]) -> str:
    """The click parameter name of a method's ``ckptavg watch`` flag (``power-ema`` → ``watch_power_ema``)."""
    return "watch_" + cls.name.replace("-", "_")


def average_flags() -> list[click.Option]:
    """One option of ``ckptavg average`` per method option (methods sharing an option share the flag)."""
    users: dict[str, list[str]] = {}
    for cls in METHODS.values():
        for p in cls.params:
            users.setdefault(p.name, []).append(cls.name)
    return [click.Option([p.flag], type=_TYPES.get(p.kind, click.STRING), default=None, metavar=p.metavar,
                         help=f"{p.help} ({', '.join(users[p.name])})")
            for p in cli_params()]


def watch_flags() -> list[click.Option]:
    """One repeatable option of ``ckptavg watch`` per method with a main option: each use is one average.
    A method without a main option that declares a ``watch_flag`` gets a plain flag: one average, default options."""
    out = []
    for cls in METHODS.values():
        flag = cls.flag_for_watch()
        if flag is None:
            continue
        if cls.main_option is None:
            out.append(click.Option([flag, _dest(cls)], is_flag=True, default=False,
                                    help=f"A {cls.name} average: {cls.summary.split(' (')[0]}."))
            continue
        p = cls.param(cls.main_option)  # type: ignore[arg-type]
        unit = f" {p.unit}" if p.unit and not p.unit.startswith("per ") else ""
        out.append(click.Option([flag, _dest(cls)], type=_TYPES.get(p.kind, click.STRING), multiple=True,
                                metavar=p.metavar, help=f"{cls.name.upper()} average: {p.name.replace('_', ' ')} "
                                                        f"{p.metavar}{unit} (repeatable)."))
    return out


def watch_averages(values: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """``[[average]]`` tables from the ``ckptavg watch`` method flags (``values``: ``watch_<method>`` → values,
    hyphens in the method name as underscores)."""
    tables: list[dict[str, Any]] = []
    for cls in METHODS.values():
        given = values.get(_dest(cls))
        if cls.main_option is None:
            if given is True:  # a plain flag
                tables.append({"method": cls.name})
            continue
        for v in given or ():
            tables.append({"method": cls.name, cls.main_option: v})
    return tables


def _needs(cls: type[Method]) -> UsageError:
    main = cls.param(cls.main_option)  # type: ignore[arg-type]
    alts = " or ".join(f"{p.flag} {p.metavar}" + (f" ({p.unit})" if p.unit else "")
                       for p in (cls.param(n) for n in cls.main_group()))
    return UsageError(f"--method {cls.name} needs {alts}, or write {cls.name}:{main.metavar}")


def parse_methods(texts: Sequence[str], given: Mapping[str, Any], *, weighted: bool) -> list[AverageSpec]:
    """``--method ema:2000 --method lawa --window 5`` → specs. ``given``: the option flags' values.

    A flag is refused when no ``--method`` uses it (``--method ema:200 --half-life 100``: the
    inline value wins, so ``--half-life`` would be silently ignored)."""
    given = {k: v for k, v in given.items() if v is not None}
    used: set[str] = set()
    specs = []
    for text in texts:
        name, _, value = text.partition(":")
        name = name.strip().lower()
        if name not in METHODS:
            raise UsageError(f"--method {text!r}: unknown method; choose one of {', '.join(METHODS)}")
        cls = METHODS[name]
        options: dict[str, Any] = {}
        if value:
            if cls.main_option is None:
                raise UsageError(f"--method {text!r}: {name} takes no value")
            main = cls.param(cls.main_option)
            try:
                options[main.name] = main.parse_text(value, method=name)
            except OptionError as e:
                raise UsageError(f"--method {text!r}: {value!r} is not {e.expected}") from None
        for p in cls.params:
            if p.name == "weighted" and not p.cli:
                options["weighted"] = weighted
            elif p.cli and p.name in given and not (value and p.name in cls.main_group()):
                options[p.name] = given[p.name]
                used.add(p.name)
        if cls.main_option is not None and not any(k in options for k in cls.main_group()):
            raise _needs(cls)
        try:
            cls.validate(options)
        except OptionError as e:
            raise phrase(e, cls) from None
        specs.append(AverageSpec(name, options))
    for key in given:
        if key not in used:
            users = [m.name for m in METHODS.values() if any(p.name == key for p in m.params)]
            inline = [t for t in texts if t.partition(":")[0].strip().lower() in users and ":" in t]
            why = (f"{', '.join(inline)} already set{'s' if len(inline) == 1 else ''} it inline" if inline
                   else f"it applies to --method {' / '.join(users)}")
            raise UsageError(f"{flag_of(key)} is not used by any --method here: {why}")
    return specs

