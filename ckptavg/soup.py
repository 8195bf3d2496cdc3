"""Greedy model soups (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482): the engine of ``ckptavg soup``.

Given models fine-tuned from one base (or runs, or earlier averages), each member is evaluated on a
held-out metric and the members are sorted best first. The soup starts as the best member; each next
member is added only if the uniform mean of the soup plus that member scores *strictly* better than the
soup without it (a tie is not added). The uniform soup of every member is evaluated and reported beside it.

Every candidate soup is a streamed uniform mean of its members — the one-shot engine's path
(:func:`~ckptavg.oneshot.average_checkpoints`: one tensor, or one piece of it, at a time; never a whole
model in memory for the arithmetic) — written to a temporary folder beside the output, handed to the
evaluator, and removed unless it is the soup being kept. Members are evaluated from hard links of their
safetensors folder, or (other formats, single files) from a one-member mean written by the same writer,
which holds the same bits.

Evaluation is passed in as a callable (``evaluate(model_dir, name) -> metrics``), so this core module never
imports the evaluators (``ckptavg.cli.soup`` builds it from ``--eval``/``--eval-python``/
``--eval-hf-perplexity``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptavg._version import __version__
from ckptavg.averaging.compat import check_inputs
from ckptavg.averaging.engine import Engine
from ckptavg.contracts.metrics import is_better
from ckptavg.errors import (
    EvaluationError,
    MixedModelsError,
    NonFiniteError,
    OutputError,
    TensorMismatchError,
    UsageError,
)
from ckptavg.oneshot import AverageSpec, _input_paths, _protect, average_checkpoints, build_averages
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint
from ckptavg.writing.atomic import AtomicDir, link_or_copy
from ckptavg.writing.export import DEFAULT_SHARD_BYTES, copy_meta_files

log = logging.getLogger(__name__)

__all__ = ["Evaluate", "MemberResult", "SoupResult", "greedy_soup"]

Evaluate = Callable[[Path, str], Mapping[str, float]]
"""``evaluate(model_dir, name)``: the metrics of the loadable model folder ``model_dir``; raise a
:class:`~ckptavg.errors.CkptavgError` (``EvaluationError``) for a failed evaluation."""

SOUP_FILE = "soup.json"
_WORK_MARK = ".ckptavg-soup-"
_OWN_FILES = ("ckptavg.json", "README.md", SOUP_FILE)


@dataclass
class MemberResult:
    """One member: its own evaluation, and what happened when it was tried in the greedy soup."""

    path: Path
    step: int | None
    fingerprint: str
    metrics: dict[str, float] | None = None
    error: str | None = None  # its evaluation failed: left out of the greedy soup
    added: bool = False
    tried: dict[str, float] | None = None  # the metrics of the soup with this member added (None: first, or failed)
    tried_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": str(self.path), "step": self.step, "fingerprint": self.fingerprint,
                             "metrics": self.metrics, "added": self.added, "soup_metrics_when_tried": self.tried}
        if self.error is not None:
            d["error"] = self.error
        if self.tried_error is not None:
            d["soup_error_when_tried"] = self.tried_error
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MemberResult:
        return cls(path=Path(d["path"]), step=d.get("step"), fingerprint=d.get("fingerprint", ""),
                   metrics=d.get("metrics"), error=d.get("error"), added=bool(d.get("added")),
                   tried=d.get("soup_metrics_when_tried"), tried_error=d.get("soup_error_when_tried"))


@dataclass
class SoupResult:
    metric: str
    mode: str  # "min": lower is better; "max": higher is better
    members: list[MemberResult]  # best first; members whose evaluation failed last
    greedy_metrics: dict[str, float]
    uniform_metrics: dict[str, float] | None
    uniform_error: str | None
    output: Path
    uniform_output: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> list[MemberResult]:
        return [m for m in self.members if m.added]

    @property
    def best_single(self) -> MemberResult:
        return self.members[0]

    @property
    def greedy_value(self) -> float:
        return self.greedy_metrics[self.metric]

    @property
    def uniform_value(self) -> float | None:
        return None if self.uniform_metrics is None else self.uniform_metrics.get(self.metric)

    def to_json(self) -> dict[str, Any]:
        return {
            "ckptavg_version": __version__,
            "method": "greedy soup",
            "reference": "https://arxiv.org/abs/2203.05482 (Wortsman et al. 2022, model soups: greedy soup)",
            "metric": self.metric, "mode": self.mode,
            "better": "lower" if self.mode == "min" else "higher",
            "members": [m.to_json() for m in self.members],
            "greedy": {"members": [str(m.path) for m in self.greedy], "metrics": self.greedy_metrics,
                       "output": str(self.output)},
            "best_single": {"path": str(self.best_single.path), "metrics": self.best_single.metrics},
            "uniform": {"members": [str(m.path) for m in self.members], "metrics": self.uniform_metrics,
                        **({"error": self.uniform_error} if self.uniform_error else {}),
                        **({"output": str(self.uniform_output)} if self.uniform_output else {})},
            "summary": self.summary(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SoupResult:
        """The record :meth:`to_json` wrote (``OUT/soup.json``), read back for ``ckptavg report``."""
        uniform = d.get("uniform") or {}
        return cls(metric=d["metric"], mode=d["mode"], members=[MemberResult.from_json(m) for m in d["members"]],
                   greedy_metrics=d["greedy"]["metrics"], uniform_metrics=uniform.get("metrics"),
                   uniform_error=uniform.get("error"), output=Path(d["greedy"]["output"]),
                   uniform_output=Path(uniform["output"]) if uniform.get("output") else None)

    def summary(self) -> str:
        """One plain sentence (or two): the greedy soup against the best single member and the uniform soup."""
        metric, better = self.metric, "lower" if self.mode == "min" else "higher"
        best = self.best_single
        bv, gv = best.metrics[metric], self.greedy_value  # type: ignore[index]
        n, k = len(self.members), len(self.greedy)
        if k == 1:
            text = (f"The greedy soup did not beat the best single model: no other member improved {metric} "
                    f"({better} is better) when added, so the greedy soup is {best.path} alone ({metric} {bv:.6g}).")
        else:
            text = (f"The greedy soup of {k} of {n} members has {metric} {gv:.6g} ({better} is better), better than "
                    f"the best single model, {best.path} ({bv:.6g}), by {abs(bv - gv):.6g}.")
        uv = self.uniform_value
        if uv is None:
            text += f" The uniform soup of all {n} could not be evaluated ({self.uniform_error or 'no ' + metric})."
        elif k == n:
            text += f" It is the uniform soup of all {n}."
        elif is_better(uv, gv, self.mode):
            text += (f" The uniform soup of all {n} scores better still ({metric} {uv:.6g}); the greedy soup is "
                     "written, as asked (--keep-uniform DIR keeps the uniform one).")
        elif uv == gv:
            text += f" The uniform soup of all {n} scores the same ({metric} {uv:.6g})."
        else:
            text += f" The uniform soup of all {n} scores worse ({metric} {uv:.6g})."
        return text


def _check_tensors(ckpts: Sequence[Checkpoint]) -> None:
    """Refuse members whose shared tensors differ in shape (another architecture) or dtype, naming both."""
    first: dict[str, tuple[Checkpoint, tuple[int, ...], torch.dtype]] = {}
    for c in ckpts:
        for name, ref in c.tensors.items():
            seen = first.setdefault(name, (c, tuple(ref.shape), ref.dtype))
            other, shape, dtype = seen
            if tuple(ref.shape) != shape:
                raise MixedModelsError(
                    f"is not the same model as {other.path}: tensor {name!r} has shape {tuple(ref.shape)} here and "
                    f"{shape} there", path=c.path,
                    hint="a soup averages models of one architecture fine-tuned from one base")
            if ref.dtype != dtype:
                raise TensorMismatchError(
                    f"tensor {name!r} is {ref.dtype} here and {dtype} in {other.path}", path=c.path, tensor=name,
                    hint="save the members in one dtype")


def _check_distinct(ckpts: Sequence[Checkpoint]) -> None:
    seen: dict[tuple[int, int], Checkpoint] = {}
    for c in ckpts:
        ident = next(iter(c.tensors.values())).identity
        key = (ident.dev, ident.ino)
        if key in seen:
            raise UsageError(f"{c.path} and {seen[key].path} are the same checkpoint; give each member once")
        seen[key] = c


def _remove_stale_work(out: Path) -> None:
    """Work folders that a killed soup left beside ``out`` (their process is gone) are removed."""
    for old in out.parent.glob(f".{out.name}{_WORK_MARK}*"):
        pid = old.name.rsplit(_WORK_MARK, 1)[1].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.warning("removing %s, the work folder of an interrupted soup", old)
        shutil.rmtree(old, ignore_errors=True)


def _value(metrics: Mapping[str, float], metric: str, what: str) -> float:
    if metric not in metrics:
        raise UsageError(f"the evaluator returned no {metric!r} for {what} (it returned {', '.join(metrics)})",
                         hint="pass --metric with one of those")
    return float(metrics[metric])


def _give_back_memory() -> None:
    """Return the heap that an averaging or an evaluation freed to the kernel (glibc's ``malloc_trim``; elsewhere a
    no-op). The one-shot engine keeps freed piece buffers in the heap (see ``engine._keep_freed_memory``); a soup runs
    many averagings and evaluations in turn, and without this each would leave its own high-water mark behind
    (measured: +90 MiB over ``ckptavg average`` of the same four 128 MiB models, none with it)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _QuietProgress(Progress):
    """The soup writes many small averages: their per-checkpoint read lines go to the debug log."""

    def checkpoint_done(self, ckpt: Checkpoint, nbytes: int, seconds: float) -> None:
        log.debug("read %s (%d bytes) in %.2f s", ckpt.label, nbytes, seconds)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Lower the info lines of logger ``name`` (the one-shot's 'averaged N checkpoints into <work folder>')."""
    logger = logging.getLogger(name)
    before = logger.level
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


class _Soup:
    """One run of :func:`greedy_soup`: its work folder, engine and settings."""

    def __init__(self, ckpts: Sequence[Checkpoint], evaluate: Evaluate, work: Path, *, engine: Engine,
                 accum_dtype: torch.dtype, max_shard_bytes: int, protected: Sequence[Path]) -> None:
        self.ckpts = list(ckpts)
        # steps mean nothing across fine-tunes (they may all be checkpoint-500): the engine folds them in the order
        # given, step-less; the members' steps stay in the soup's record
        self.stepless = {id(c): dataclasses.replace(c, step=None, step_source="soup member") for c in ckpts}
        self.evaluate = evaluate
        self.work = work
        self.engine = engine
        self.accum_dtype = accum_dtype
        self.max_shard_bytes = max_shard_bytes
        self.protected = list(protected)
        self.count = 0

    def mean(self, members: Sequence[Checkpoint], name: str) -> Path:
        """The uniform mean of ``members`` written (streamed) to a fresh folder of the work folder."""
        self.count += 1
        folder = self.work / f"{self.count:03d}-{name}"
        averages = build_averages([AverageSpec("uniform", name="soup")], accum_dtype=self.accum_dtype,
                                  device=self.engine.device)
        try:
            with _quiet("ckptavg.oneshot"):
                average_checkpoints([self.stepless[id(c)] for c in members], averages, folder, engine=self.engine,
                                    max_shard_bytes=self.max_shard_bytes, protected=self.protected,
                                    progress=_QuietProgress())
        finally:
            _give_back_memory()
        return folder

    def member_folder(self, c: Checkpoint, name: str) -> Path:
        """A loadable model folder of member ``c``: hard links of its weights (and index) when it is a standard model
        folder (``model.safetensors``, or shards with ``model.safetensors.index.json``), else its one-model mean."""
        index = c.path / "model.safetensors.index.json"
        standard = c.path.is_dir() and not c.aliases and all(f.parent == c.path for f in c.files) and (
            (c.format == "safetensors" and [f.name for f in c.files] == ["model.safetensors"])
            or (c.format == "safetensors-sharded" and c.weights_name == "model" and index.is_file()))
        if not standard:
            return self.mean([c], name)
        self.count += 1
        folder = self.work / f"{self.count:03d}-{name}"
        folder.mkdir()
        for f in [*c.files, *([index] if c.format == "safetensors-sharded" else [])]:
            link_or_copy(f, folder / f.name)
        copy_meta_files(c.meta_dir, folder)
        return folder

    def score(self, folder: Path, name: str) -> dict[str, float]:
        try:
            metrics = dict(self.evaluate(folder, name))
        finally:
            _give_back_memory()
        for k, v in metrics.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise EvaluationError(f"metric {k!r} of {name} is {v!r}",
                                      hint="the model diverged or the evaluator is broken")
        return metrics


def greedy_soup(
    ckpts: Sequence[Checkpoint],
    evaluate: Evaluate,
    out: Path,
    *,
    metric: str | None = None,
    mode: str = "min",
    engine: Engine | None = None,
    accum_dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    protected: Sequence[Path] = (),
    keep_uniform: Path | None = None,
) -> SoupResult:
    """The greedy soup of ``ckpts`` by ``metric`` (default: the evaluator's first), written to ``out``.

    ``mode`` ``"min"``: lower is better (a loss); ``"max"``: higher is better (an accuracy). A member is added
    only if the soup with it scores strictly better. Members of different models are refused before anything is
    evaluated. ``keep_uniform``: also write the uniform soup of every member there.
    """
    if mode not in ("min", "max"):
        raise UsageError(f"--mode {mode!r}: expected min or max")
    if len(ckpts) < 2:
        raise UsageError(f"a soup needs at least two models, got {len(ckpts)}")
    _check_distinct(ckpts)
    check_inputs(ckpts)  # MixedModelsError: another config model_type/architectures, or other tensor names
    _check_tensors(ckpts)
    out = Path(out)
    protected = [*protected, *_input_paths(ckpts)]
    targets = [out] + ([Path(keep_uniform)] if keep_uniform is not None else [])
    if keep_uniform is not None and Path(keep_uniform).resolve() == out.resolve():
        raise UsageError("--keep-uniform must be another folder than -o")
    for t in targets:
        _protect(t, protected)
        if t.exists() and not force:
            raise OutputError("already exists", path=t, hint="pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work(out)
    work = out.parent / f".{out.name}{_WORK_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()
    owns_engine = engine is None
    engine = engine or Engine(device="cpu")
    soup = _Soup(ckpts, evaluate, work, engine=engine, accum_dtype=accum_dtype, max_shard_bytes=max_shard_bytes,
                 protected=protected)
    try:
        return _run(soup, out, metric=metric, mode=mode, force=force, keep_uniform=keep_uniform)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if owns_engine:
            engine.close()


def _run(soup: _Soup, out: Path, *, metric: str | None, mode: str, force: bool,
         keep_uniform: Path | None) -> SoupResult:
    ckpts = soup.ckpts
    results = {id(c): MemberResult(c.path, c.step, c.fingerprint) for c in ckpts}
    for i, c in enumerate(ckpts, 1):
        r = results[id(c)]
        name = f"member-{i}"
        try:
            folder = soup.member_folder(c, name)
            try:
                r.metrics = soup.score(folder, name)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        except (EvaluationError, NonFiniteError) as e:
            r.error = str(e)
            log.warning("%s: evaluation failed, left out of the soup: %s", c.path, e)
            continue
        if metric is None:
            metric = next(iter(r.metrics))
            log.info("ranking by %s (%s is better); pass --metric to choose", metric,
                     "lower" if mode == "min" else "higher")
        value = _value(r.metrics, metric, str(c.path))
        log.info("%s: %s = %.6g", c.path, metric, value)
    scored = [c for c in ckpts if results[id(c)].metrics is not None]
    if not scored:
        raise EvaluationError(f"the evaluation of every member failed; the first: {results[id(ckpts[0])].error}")
    assert metric is not None
    sign = 1.0 if mode == "min" else -1.0
    # a stable sort: members that tie keep the order given
    scored.sort(key=lambda c: sign * results[id(c)].metrics[metric])  # type: ignore[index]
    failed = [c for c in ckpts if results[id(c)].metrics is None]

    best = results[id(scored[0])]
    best.added = True
    members = [scored[0]]
    current: dict[str, float] = dict(best.metrics)  # type: ignore[arg-type]
    kept: Path | None = None  # the folder holding the current soup (None: the best member alone, not written)
    everyone: tuple[Path, dict[str, float]] | None = None  # a trial that held every member: the uniform soup
    for c in scored[1:]:
        r = results[id(c)]
        trial = [*members, c]
        name = f"soup-{len(trial)}"
        try:
            folder = soup.mean(trial, name)
        except NonFiniteError as e:
            r.tried_error = str(e)
            log.warning("%s: not added, the soup with it cannot be written: %s", c.path, e)
            continue
        try:
            r.tried = soup.score(folder, name)
            value = _value(r.tried, metric, f"the soup with {c.path}")
        except EvaluationError as e:
            r.tried_error = str(e)
            log.warning("%s: not added, the soup with it could not be evaluated: %s", c.path, e)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if len(trial) == len(ckpts):
            everyone = (folder, r.tried)
        if is_better(value, current[metric], mode):
            log.info("%s: added (%s %.6g -> %.6g)", c.path, metric, current[metric], value)
            r.added = True
            members = trial
            current = r.tried
            if kept is not None and (everyone is None or kept != everyone[0]):
                shutil.rmtree(kept, ignore_errors=True)
            kept = folder
        else:
            log.info("%s: not added (%s %.6g with it, %.6g without)", c.path, metric, value, current[metric])
            if everyone is None or folder != everyone[0]:
                shutil.rmtree(folder, ignore_errors=True)

    uniform_metrics: dict[str, float] | None = None
    uniform_error: str | None = None
    uniform_folder: Path | None = None
    if everyone is not None:  # the last trial held every member (the greedy soup, if it was added)
        uniform_folder, uniform_metrics = everyone
    else:
        try:
            uniform_folder = soup.mean([*scored, *failed], "uniform-soup")
            uniform_metrics = soup.score(uniform_folder, "uniform-soup")
            _value(uniform_metrics, metric, "the uniform soup")
        except (EvaluationError, NonFiniteError) as e:
            uniform_error = str(e)
            log.warning("the uniform soup of all %d members: %s", len(ckpts), e)
    if kept is None:
        kept = soup.mean(members, "greedy-soup")

    ordered = [results[id(c)] for c in [*scored, *failed]]
    result = SoupResult(metric=metric, mode=mode, members=ordered, greedy_metrics=current,
                        uniform_metrics=uniform_metrics, uniform_error=uniform_error, output=out,
                        uniform_output=None if uniform_folder is None else keep_uniform)
    summary = result.to_json()
    _publish(kept, out, summary, force=force, what="greedy")
    if result.uniform_output is not None:
        assert uniform_folder is not None
        _publish(uniform_folder, result.uniform_output, summary, force=force, what="uniform")
    return result


def _publish(src: Path, dst: Path, summary: dict[str, Any], *, force: bool, what: str) -> None:
    """``dst`` (atomically): the weights and meta files of the soup folder ``src`` (hard links), its provenance with
    the soup's record added, ``soup.json`` and a model card that says what the soup is."""
    prov = json.loads((src / "ckptavg.json").read_text())
    prov["soup"] = {**summary, "this": what}
    card = (src / "README.md").read_text()
    with AtomicDir(dst, replace=force) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in _OWN_FILES:
                link_or_copy(f, tmp / f.name)
        (tmp / "ckptavg.json").write_text(json.dumps(prov, indent=2) + "\n")
        (tmp / SOUP_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "README.md").write_text(soup_card(summary, what) + "\n" + _card_body(card))
    log.info("%s soup written to %s", what, dst)


def _card_body(card: str) -> str:
    """The averaging card without its front matter (the soup card has its own)."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4:].lstrip("\n")
    return card


def soup_card(summary: dict[str, Any], what: str) -> str:
    metric, better = summary["metric"], summary["better"]
    title = "Greedy soup" if what == "greedy" else "Uniform soup"
    lines = ["---", "tags:", "- ckptavg", "- model-soup", "---", "",
             f"# {title} made with ckptavg", "",
             (f"Members ranked by **{metric}** ({better} is better) on the held-out evaluation; the greedy soup adds a "
              "member only if the uniform mean with it scores strictly better "
              "([model soups](https://arxiv.org/abs/2203.05482))."), "",
             f"| # | member | {metric} | soup {metric} when tried | in the greedy soup |", "|---|---|---|---|---|"]
    for i, m in enumerate(summary["members"], 1):
        own = "failed" if m["metrics"] is None else f"{m['metrics'][metric]:.6g}"
        tried = m["soup_metrics_when_tried"]
        lines.append(f"| {i} | `{m['path']}` | {own} | {'' if tried is None else f'{tried[metric]:.6g}'} | "
                     f"{'yes' if m['added'] else 'no'} |")
    uniform = summary["uniform"]["metrics"]
    shown = "not evaluated" if uniform is None else f"{uniform[metric]:.6g}"
    lines += ["", (f"Greedy soup: {metric} {summary['greedy']['metrics'][metric]:.6g}; uniform soup of all "
                   f"{len(summary['members'])}: {shown}."), "",
              summary["summary"], "", "The averaging itself:", ""]
    return "\n".join(lines)
