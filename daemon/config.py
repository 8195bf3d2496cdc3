"""The daemon's configuration: a TOML file (or ``ckptavg watch`` flags) into frozen dataclasses.

Every key is validated when the file is loaded, and an error names the file,
the key and what was expected. ``systemd/exp1.toml`` documents every key.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..methods import METHODS, make_method
from ..rules import Rule, parse_rule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AverageConfig", "WatchConfig", "load_config", "config_from_flags"]

_METHOD_OPTIONS = {"ema": ("half_life", "decay"), "lawa": ("window",), "swa": ("start_step",), "uniform": ()}


@dataclass(frozen=True)
class AverageConfig:
    method: str
    options: dict[str, Any]
    name: str
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class WatchConfig:
    watch: Path
    output: Path
    averages: tuple[AverageConfig, ...]
    state_dir: Path | None = None
    device: str = "auto"
    accum_dtype: str = "float32"
    publish_every: int = 1
    persist_every: int = 1
    poll: str = "auto"  # auto | always | never
    poll_interval: float = 10.0
    settle: float = 5.0
    marker: str | None = None
    late_policy: str = "skip"
    on_shape_change: str = "error"
    keep_for_lawa: str = "auto"  # auto | link | copy
    nice: int = 10
    ionice_idle: bool = True
    threads: int = 1  # torch CPU threads: folding is memory-bound, and idle OpenMP workers spin on the trainer's cores
    rules: tuple[Rule, ...] = ()
    source: str = "flags"  # where this came from, for messages

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.output / ".ckptavg"


_CHOICES = {
    "device": None, "accum_dtype": ("float32", "float64"), "poll": ("auto", "always", "never"),
    "late_policy": ("skip",), "on_shape_change": ("error", "reset"), "keep_for_lawa": ("auto", "link", "copy"),
}
_TOP_KEYS = {f.name for f in fields(WatchConfig)} - {"averages", "source"} | {"average"}


def _err(source: str, key: str, what: str) -> UsageError:
    return UsageError(f"{key}: {what}", path=source if source != "flags" else None)


def _typed(source: str, key: str, value: Any, kind: type, *, minimum: float | None = None) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _err(source, key, f"expected {kind.__name__}, got {value!r}")
    if minimum is not None and (value < minimum or (kind is float and not math.isfinite(value))):
        raise _err(source, key, f"must be at least {minimum:g}, got {value!r}")
    return value


def _rules(source: str, key: str, value: Any) -> tuple[Rule, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(source, key, "expected a list of 'GLOB=ACTION' strings")
    try:
        return tuple(parse_rule(v) for v in value)
    except UsageError as e:
        raise _err(source, key, e.message) from None


def _average(source: str, index: int, table: Any) -> AverageConfig:
    where = f"average[{index}]"
    if not isinstance(table, dict):
        raise _err(source, where, "expected a table")
    method = table.get("method")
    if method not in METHODS:
        raise _err(source, f"{where}.method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    allowed = {"method", "name", "rules", *_METHOD_OPTIONS[method]}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _err(source, f"{where}.{unknown[0]}", f"unknown key for method {method} (allowed: {', '.join(sorted(allowed))})")
    options = {k: table[k] for k in _METHOD_OPTIONS[method] if k in table}
    try:
        built = make_method(method, **options)
    except (UsageError, TypeError) as e:
        raise _err(source, where, getattr(e, "message", str(e))) from None
    name = table.get("name", built.label())
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise _err(source, f"{where}.name", f"expected a plain folder name, got {name!r}")
    return AverageConfig(method, options, name, _rules(source, f"{where}.rules", table.get("rules", [])))


def build_config(data: dict[str, Any], *, source: str) -> WatchConfig:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _err(source, unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("watch", "output"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _err(source, key, "required: a folder path")
    tables = data.get("average", [])
    if not isinstance(tables, list) or not tables:
        raise _err(source, "average", "at least one [[average]] table (or --ema/--lawa/--swa) is required")
    averages = tuple(_average(source, i, t) for i, t in enumerate(tables))
    names = [a.name for a in averages]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _err(source, "average", f"two averages are named {dup!r}; set name = ... on one")
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("watch", "output", "average"):
            continue
        if key == "state_dir":
            kw[key] = Path(_typed(source, key, value, str)) if value else None
        elif key == "marker":
            kw[key] = _typed(source, key, value, str) or None
        elif key == "rules":
            kw[key] = _rules(source, key, value)
        elif key in ("publish_every", "persist_every"):
            kw[key] = _typed(source, key, value, int, minimum=1)
        elif key == "nice":
            kw[key] = _typed(source, key, value, int, minimum=0)
        elif key == "threads":
            kw[key] = _typed(source, key, value, int, minimum=1)
        elif key in ("poll_interval", "settle"):
            kw[key] = _typed(source, key, value, float, minimum=0.0)
        elif key == "ionice_idle":
            kw[key] = _typed(source, key, value, bool)
        else:
            value = _typed(source, key, value, str)
            if _CHOICES.get(key) and value not in _CHOICES[key]:
                raise _err(source, key, f"expected one of {', '.join(_CHOICES[key])}, got {value!r}")
            kw[key] = value
    watch, output = Path(data["watch"]), Path(data["output"])
    wr, orr = watch.resolve(), output.resolve()
    if orr == wr or wr in orr.parents:
        raise _err(source, "output", f"{output} is inside the watched folder {watch}; ckptavg never writes there")
    if orr in wr.parents:
        raise _err(source, "output", f"{output} contains the watched folder {watch}; publishing there could replace it")
    return WatchConfig(watch=watch, output=output, averages=averages, source=source, **kw)


def load_config(path: Path, **overrides: Any) -> WatchConfig:
    """Read a TOML config; ``overrides`` (non-None) replace keys, as command-line flags do."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError("config file not found", path=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"not valid TOML: {e}", path=path) from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(data, source=str(path))


def config_from_flags(watch: str, output: str, *, ema: tuple[float, ...] = (), lawa: tuple[int, ...] = (),
                      swa_start: tuple[int, ...] = (), **options: Any) -> WatchConfig:
    """``ckptavg watch RUN -o OUT --ema 2000 --lawa 5 --swa-start 6000`` → a config."""
    tables: list[dict[str, Any]] = [{"method": "ema", "half_life": h} for h in ema]
    tables += [{"method": "lawa", "window": k} for k in lawa]
    tables += [{"method": "swa", "start_step": s} for s in swa_start]
    data = {"watch": watch, "output": output, "average": tables, **{k: v for k, v in options.items() if v is not None}}
    return build_config(data, source="flags")

