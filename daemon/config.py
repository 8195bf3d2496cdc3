"""The daemon's configuration: a TOML file (or ``ckptavg watch`` flags) into frozen dataclasses.

Every key is validated when the file is loaded, and an error names the file,
the key and what was expected. ``systemd/exp1.toml`` documents every key.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ckptavg.averaging.methods import METHODS
from ckptavg.averaging.rules import Rule, parse_rule
from ckptavg.errors import OptionError, UsageError
from ckptavg.reading.remote import is_url, remember_option_secrets
from ckptavg.units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AverageConfig", "EvalConfig", "HubConfig", "WatchConfig", "config_from_flags", "load_config"]

@dataclass(frozen=True)
class AverageConfig:
    method: str
    options: dict[str, Any]
    name: str
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class EvalConfig:
    """``[evaluate]``: how each round's candidates are validated and the best one chosen."""

    kind: str  # command | python | hf-perplexity
    options: dict[str, Any]  # the evaluator's own keys (command/timeout, function, data/batch_size/...)
    metric: str | None = None  # None: the first metric the evaluator returns
    mode: str = "min"
    every: int = 1  # an evaluation round every N folds
    raw: bool = True  # also evaluate the raw newest checkpoint (the baseline)
    best_grace: float = 600.0  # seconds an old version of best/ is kept after it was replaced


@dataclass(frozen=True)
class HubConfig:
    """``[hub]``: push the best model to a Hugging Face Hub repo."""

    repo: str
    revision: str | None = None
    private: bool = False
    endpoint: str | None = None


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
    poll_interval: float = 2.0  # a full rescan: cheap, and short enough that rotation rarely outruns it
    settle: float = 5.0
    marker: str | None = None
    on_shape_change: str = "error"
    on_rewind: str = "rollback"  # rollback | ignore: a trainer that resumed from an earlier checkpoint
    rewind_too_far: str = "restart"  # restart | stop: no kept generation reaches back to the resume point
    keep_generations: int = 4  # state generations kept (each: the averages' accumulators on disk)
    keep_for_lawa: str = "auto"  # auto | link | copy
    deepspeed_weights: str = "fp32"  # fp32 (the master weights) | module (the bf16/fp16 module weights)
    nice: int = 10
    ionice_idle: bool = True
    threads: int = 1  # torch CPU threads: folding is memory-bound, and idle OpenMP workers spin on the trainer's cores
    memory_budget: int | None = None  # bytes of host memory for accumulators; beyond it they live in STATE_DIR/store
    rules: tuple[Rule, ...] = ()
    evaluate: EvalConfig | None = None
    hub: HubConfig | None = None
    sweep: tuple[str, ...] = ()  # [sweep] grid: its averages are in ``averages`` (expanded at load)
    storage: tuple[tuple[str, Any], ...] = ()  # [storage]: fsspec options for an s3:// (gs://, ...) run
    watch_url: str | None = None  # the run in object storage; ``watch`` is then its local mirror (daemon/remote.py)
    source: str = "flags"  # where this came from, for messages

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.output / ".ckptavg"


_CHOICES = {
    "device": None, "accum_dtype": ("float32", "float64"), "poll": ("auto", "always", "never"),
    "on_shape_change": ("error", "reset"), "on_rewind": ("rollback", "ignore"), "rewind_too_far": ("restart", "stop"), "keep_for_lawa": ("auto", "link", "copy"),
    "deepspeed_weights": ("fp32", "module"),
}
_TOP_KEYS = {f.name for f in fields(WatchConfig)} - {"averages", "source", "watch_url"} | {"average"}


_FLAG_OF_KEY = {"watch": "RUN", "average": "the method flags", "evaluate": "--eval", "rules": "--rule", "hub": "--hub", "hub.repo": "--hub", "hub.revision": "--hub-revision",
                "evaluate.command": "--eval", "evaluate.function": "--eval-python", "evaluate.data": "--eval-hf-perplexity",
                "evaluate.timeout": "--eval-timeout", "evaluate.every": "--eval-every", "evaluate.metric": "--metric",
                "evaluate.mode": "--mode"}


def flag_of_key(key: str) -> str:
    """The ``ckptavg watch`` flag that sets config ``key`` (``threads`` → ``--threads``,
    ``average[0].half_life`` → ``--ema``); the key itself where no flag sets it."""
    if key in _FLAG_OF_KEY:
        return _FLAG_OF_KEY[key]
    if key.startswith("average[") and "." in key:
        option = key.split(".", 1)[1]
        flags = [cls.flag_for_watch() for cls in METHODS.values() if cls.main_option == option]
        return flags[0] or key if flags else key
    if key.isidentifier():
        return "--" + key.replace("_", "-")
    return key


def _err(source: str, key: str, what: str) -> UsageError:
    """A configuration error naming the file and the key (or, for ``ckptavg watch`` flags, the flag)."""
    if source == "flags":
        return UsageError(f"{flag_of_key(key)}: {what}")
    return UsageError(f"{key}: {what}", path=source)


DAY, WEEK = 86400.0, 604800.0
NAME_MAX_BYTES = 128  # an average's name; version folders, staging names and eval logs add up to ~100 bytes
RESERVED_NAMES = {".ckptavg": "the daemon's state folder (OUTPUT/.ckptavg)", "best": "the best model's link (OUTPUT/best)",
                  ".best-versions": "the best model's versions (OUTPUT/.best-versions)"}


def max_threads() -> int:
    """The most torch CPU threads a daemon may ask for: 4 per CPU of this machine."""
    return 4 * (os.cpu_count() or 1)


def _typed(source: str, key: str, value: Any, kind: type, *, minimum: float | None = None,
           maximum: float | None = None, why: str = "") -> Any:
    """``value`` checked as ``kind`` in [minimum, maximum]; ``why`` explains the upper bound in the message."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _err(source, key, f"expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise _err(source, key, f"must be a finite number, got {value!r}")
    if maximum is not None and (value > maximum or (minimum is not None and value < minimum)):
        low = f"{minimum:g} and " if minimum is not None else ""
        raise _err(source, key, f"must be between {low}{maximum:g}{why}, got {value!r}")
    if minimum is not None and value < minimum:
        raise _err(source, key, f"must be at least {minimum:g}, got {value!r}")
    return value


def _all_excluded(rules: tuple[Rule, ...]) -> Rule | None:
    """The rule that excludes every tensor, or None: a rule matching every name, reached after exclusions only
    (the first matching rule wins, so any rule before it that keeps something may keep a tensor)."""
    for rule in rules:
        if rule.action != "exclude":
            return None
        if set(rule.glob) == {"*"}:
            return rule
    return None


def _check_rules(source: str, key: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    everything = _all_excluded(rules)
    if everything is not None:
        raise _err(source, key, f"{str(everything)!r} excludes every tensor (the first matching rule wins), so "
                                f"nothing would be published; exclude only some tensors, e.g. '*.lm_head.*=exclude'")
    return rules


def _state_folder_in_output(data: dict[str, Any]) -> str | None:
    """The name of ``state_dir`` when it is a folder directly in ``output`` (an average there would collide), else None."""
    state_dir, output = data.get("state_dir"), data.get("output")
    if not (isinstance(state_dir, str) and state_dir and isinstance(output, str) and output):
        return None
    try:
        inside = Path(state_dir).resolve().parent == Path(output).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return Path(state_dir).name if inside else None


def _name(source: str, key: str, name: Any, state_folder: str | None) -> str:
    """An average's folder name in OUTPUT: plain, not the daemon's own, and short enough for every name built on it."""
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or name.startswith("."):
        raise _err(source, key, f"expected a plain folder name (no '/', no NUL, not starting with '.'), got {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        raise _err(source, key, f"at most {NAME_MAX_BYTES} bytes (version folders and file names are built on it), "
                                f"got {len(name.encode('utf-8', 'surrogateescape'))}")
    reserved = dict(RESERVED_NAMES)
    if state_folder is not None:
        reserved.setdefault(state_folder, "the state folder (state_dir)")
    if name in reserved:
        raise _err(source, key, f"{name!r} is taken by {reserved[name]}; choose another name")
    return name


def _size(source: str, key: str, value: Any) -> int | None:
    """A byte size: an int, or a string like "8GiB" / "500MB"; 0 or "" turns the bound off."""
    if value in (0, "") and not isinstance(value, bool):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _err(source, key, f"expected a size like \"8GiB\" or a number of bytes, got {value!r}")
    try:
        return parse_size(value, option=key)
    except OptionError as e:
        raise _err(source, key, e.requirement()) from None


def _rules(source: str, key: str, value: Any) -> tuple[Rule, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(source, key, "expected a list of 'GLOB=ACTION' strings")
    try:
        return tuple(parse_rule(v) for v in value)
    except OptionError as e:
        raise _err(source, key, e.requirement()) from None


def _average(source: str, index: int, table: Any, state_folder: str | None = None) -> AverageConfig:
    """One ``[[average]]`` table: its keys are the method's declared options (see ckptavg.averaging.methods)."""
    where = f"average[{index}]"
    if not isinstance(table, dict):
        raise _err(source, where, "expected a table")
    method = table.get("method")
    if method not in METHODS:
        raise _err(source, f"{where}.method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    cls = METHODS[method]
    declared = [p.name for p in cls.params]
    allowed = {"method", "name", "rules", *declared}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _err(source, f"{where}.{unknown[0]}", f"unknown key for method {method} (allowed: {', '.join(sorted(allowed))})")
    options = {k: table[k] for k in declared if k in table}
    try:
        built = cls(**options)
    except OptionError as e:
        if e.problem == "invalid":
            raise _err(source, f"{where}.{e.options[0]}", e.requirement()) from None
        raise _err(source, where, e.phrase(method_name=f"method {method}")) from None
    name = _name(source, f"{where}.name", table.get("name", built.label()), state_folder)
    rules = _check_rules(source, f"{where}.rules", _rules(source, f"{where}.rules", table.get("rules", [])))
    return AverageConfig(method, options, name, rules)


def _sweep(source: str, table: Any) -> tuple[str, ...]:
    """``[sweep]``: ``grid = ["ema:500,1000,2000", "lawa:3,5,10"]``, as ``ckptavg sweep --grid`` takes it."""
    if not isinstance(table, dict) or set(table) - {"grid"}:
        raise _err(source, "sweep", 'expected a table with one key: grid = ["ema:500,1000", "lawa:3,5"]')
    grid = table.get("grid")
    if isinstance(grid, str):
        grid = [grid]
    if not isinstance(grid, list) or not grid or not all(isinstance(g, str) for g in grid):
        raise _err(source, "sweep.grid", 'expected a list of "METHOD:V1,V2,..." strings, e.g. ["ema:500,1000"]')
    return tuple(grid)


def _sweep_tables(source: str, grid: tuple[str, ...]) -> list[dict[str, Any]]:
    """The ``[[average]]`` tables a sweep grid stands for: the daemon keeps each average current as the run
    trains, evaluates them all in every round, and publishes the best (``ckptavg status`` names it)."""
    from ckptavg.sweep import LAST, parse_grid

    try:
        points = parse_grid(grid)
    except UsageError as e:
        raise _err(source, "sweep.grid", str(e).replace("--grid ", "")) from None
    for p in points:
        if p.option == LAST:
            raise _err(source, "sweep.grid", f"{p.method}:{p.horizon} (the newest {p.horizon} checkpoints) is a "
                                             f"one-shot grid point; as the run trains use lawa:{p.horizon}, the mean "
                                             f"of the newest {p.horizon}")
    return [{"method": p.method, p.option: p.horizon} for p in points]


_EVAL_KEYS = {
    "command": {"command": str, "timeout": float, "pass_hub_token": bool},
    "python": {"function": str, "kwargs": dict},
    "hf-perplexity": {"data": str, "batch_size": int, "seq_len": int, "max_tokens": int, "tokenizer": str,
                      "device": str, "dtype": str, "text_field": str},
}
_EVAL_COMMON = {"kind": str, "metric": str, "mode": str, "every": int, "raw": bool, "best_grace": float}
_EVAL_REQUIRED = {"command": "command", "python": "function", "hf-perplexity": "data"}


def _evaluate(source: str, table: Any) -> EvalConfig:
    if not isinstance(table, dict):
        raise _err(source, "evaluate", "expected a table ([evaluate])")
    kind = table.get("kind")
    if kind is None:  # inferred from the one evaluator key present
        present = [k for k, key in _EVAL_REQUIRED.items() if key in table]
        if len(present) != 1:
            raise _err(source, "evaluate.kind", "set kind = \"command\" | \"python\" | \"hf-perplexity\"")
        kind = present[0]
    if kind not in _EVAL_KEYS:
        raise _err(source, "evaluate.kind", f"expected one of {', '.join(_EVAL_KEYS)}, got {kind!r}")
    allowed = {**_EVAL_COMMON, **_EVAL_KEYS[kind]}
    if "pass_hub_token" in table and kind != "command":
        raise _err(source, "evaluate.pass_hub_token", f"applies to kind command only; a {kind} evaluator runs inside "
                                                      "the daemon and sees its environment")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _err(source, f"evaluate.{unknown[0]}", f"unknown key for kind {kind} (allowed: {', '.join(sorted(allowed))})")
    if _EVAL_REQUIRED[kind] not in table:
        raise _err(source, f"evaluate.{_EVAL_REQUIRED[kind]}", f"required for kind {kind}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind_of = allowed[key]
        minimum = 1 if key in ("every", "batch_size", "seq_len", "max_tokens") else 0.0 if kind_of is float else None
        if kind_of is dict:
            if not isinstance(value, dict):
                raise _err(source, f"evaluate.{key}", "expected a table")
            values[key] = value
        else:
            week = key in ("timeout", "best_grace")
            values[key] = _typed(source, f"evaluate.{key}", value, kind_of, minimum=minimum,
                                 maximum=WEEK if week else None, why=" seconds (a week)" if week else "")
    if values.get("mode", "min") not in ("min", "max"):
        raise _err(source, "evaluate.mode", f"expected min or max, got {values['mode']!r}")
    if "timeout" in values and values["timeout"] <= 0:
        raise _err(source, "evaluate.timeout", "must be positive")
    common = {k: values.pop(k) for k in list(values) if k in _EVAL_COMMON and k != "kind"}
    values.pop("kind", None)
    return EvalConfig(kind=kind, options=values, **common)


def _hub(source: str, table: Any) -> HubConfig:
    if not isinstance(table, dict):
        raise _err(source, "hub", "expected a table ([hub]) with repo = \"org/name\"")
    allowed = {"repo": str, "revision": str, "private": bool, "endpoint": str}
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _err(source, f"hub.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    if not isinstance(table.get("repo"), str) or "/" not in table["repo"]:
        raise _err(source, "hub.repo", f"expected 'org/name', got {table.get('repo')!r}")
    values = {k: _typed(source, f"hub.{k}", v, allowed[k]) for k, v in table.items()}
    hub = HubConfig(**{k: (v or None) if k in ("revision", "endpoint") else v for k, v in values.items()})
    from ckptavg.publishing.hub import (
        HubTarget,  # validates the repo id, branch and endpoint now, not at the first best model
    )

    try:
        HubTarget(hub.repo, revision=hub.revision, private=hub.private, endpoint=hub.endpoint)
    except UsageError as e:
        raise _err(source, "hub", e.message) from None
    return hub


def build_config(data: dict[str, Any], *, source: str) -> WatchConfig:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _err(source, unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("watch", "output"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _err(source, key, "required: a folder path")
    tables = data.get("average", [])
    grid = _sweep(source, data["sweep"]) if data.get("sweep") is not None else ()
    if isinstance(tables, list) and grid:
        tables = [*tables, *_sweep_tables(source, grid)]
    if not isinstance(tables, list) or not tables:
        raise _err(source, "average", "at least one [[average]] table (or --ema/--lawa/--swa, or a [sweep] grid) "
                                      "is required")
    state_folder = _state_folder_in_output(data)
    averages = tuple(_average(source, i, t, state_folder) for i, t in enumerate(tables))
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
            kw[key] = _check_rules(source, key, _rules(source, key, value))
        elif key == "evaluate":
            kw[key] = _evaluate(source, value) if value else None
        elif key == "hub":
            kw[key] = _hub(source, value) if value else None
        elif key == "sweep":
            kw[key] = grid
        elif key in ("publish_every", "persist_every"):
            kw[key] = _typed(source, key, value, int, minimum=1)
        elif key == "nice":
            kw[key] = _typed(source, key, value, int, minimum=0, maximum=19, why=" (a niceness increment)")
        elif key == "threads":
            kw[key] = _typed(source, key, value, int, minimum=1, maximum=max_threads(),
                             why=f" (4 per CPU; this machine has {os.cpu_count() or 1})")
        elif key == "keep_generations":
            kw[key] = _typed(source, key, value, int, minimum=2)
        elif key in ("poll_interval", "settle"):
            kw[key] = _typed(source, key, value, float, minimum=0.0, maximum=DAY, why=" seconds (a day)")
        elif key == "ionice_idle":
            kw[key] = _typed(source, key, value, bool)
        elif key == "memory_budget":
            kw[key] = _size(source, key, value)
        elif key == "storage":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise _err(source, key, "expected a table of storage options (e.g. endpoint_url = \"http://host:9000\")")
            remember_option_secrets(value)
            kw[key] = tuple(sorted(value.items()))
        else:
            value = _typed(source, key, value, str)
            if _CHOICES.get(key) and value not in _CHOICES[key]:
                raise _err(source, key, f"expected one of {', '.join(_CHOICES[key])}, got {value!r}")
            kw[key] = value
    watch, output = Path(data["watch"]), Path(data["output"])
    if is_url(data["watch"]):  # object storage: the daemon watches a local mirror beside its state folder
        state = kw.get("state_dir") or output / ".ckptavg"
        return WatchConfig(watch=state.parent / f"{state.name}-mirror", watch_url=data["watch"], output=output,
                           averages=averages, source=source, **kw)
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
    tuning = overrides.pop("evaluate_overrides", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if tuning:  # --metric/--mode/--eval-every/--eval-timeout over the file's [evaluate]
        if not isinstance(data.get("evaluate"), dict):
            raise UsageError("--metric/--mode/--eval-every/--eval-timeout: the config has no [evaluate] table", path=path)
        data["evaluate"] = {**data["evaluate"], **tuning}
    return build_config(data, source=str(path))


def config_from_flags(watch: str, output: str, averages: list[dict[str, Any]], **options: Any) -> WatchConfig:
    """``ckptavg watch RUN -o OUT --ema 2000 --lawa 5 --swa-start 6000`` → a config; ``averages`` are the
    ``[[average]]`` tables the flags stand for (``{"method": "ema", "half_life": 2000.0}``)."""
    data = {"watch": watch, "output": output, "average": averages, **{k: v for k, v in options.items() if v is not None}}
    return build_config(data, source="flags")


def evaluate_config(table: dict[str, Any], *, source: str) -> EvalConfig:
    """An ``[evaluate]`` table (from a TOML file or built from flags) checked as the daemon checks it
    (``ckptavg sweep`` takes the same evaluators)."""
    return _evaluate(source, table)
