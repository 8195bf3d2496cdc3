"""ckptavg.evaluators: validation of averaged weights.

One protocol (:class:`~ckptavg.evaluators.base.Evaluator`): ``evaluate(candidate)
-> dict[str, float]``. Built-ins:

* ``command`` — a shell template with ``{model_dir}``, ``{step}``, ``{name}`` that
  prints a JSON object of metrics on its last stdout line (:mod:`.command`);
* ``python`` — ``package.module:function`` called in-process with a state dict or
  the model folder (:mod:`.python`);
* ``hf-perplexity`` — a causal LM from the folder's config, perplexity on a
  text/jsonl file (:mod:`.hf_perplexity`).

:func:`~ckptavg.evaluators.bn.update_bn` recalibrates BatchNorm statistics for
averaged CNN weights. Installed as ``ckptavg.evaluators`` (pyproject.toml maps
the top-level ``evaluators/`` folder into the ``ckptavg`` namespace).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptavg.errors import UsageError
from ckptavg.evaluators.base import Candidate, EvaluationError, Evaluator, check_metrics

__all__ = ["KINDS", "Candidate", "EvaluationError", "Evaluator", "check_metrics", "make_evaluator"]

KINDS = ("command", "python", "hf-perplexity")


def make_evaluator(kind: str, options: dict[str, Any], *, log_dir: Path | None = None) -> Evaluator:
    """Build an evaluator from its config table (``[evaluate]``) or flags."""
    opts = dict(options)
    if kind == "command":
        from ckptavg.evaluators.command import CommandEvaluator

        return CommandEvaluator(opts.pop("command"), log_dir=log_dir, **opts)
    if kind == "python":
        from ckptavg.evaluators.python import PythonEvaluator

        return PythonEvaluator(opts.pop("function"), **opts.pop("kwargs", {}))
    if kind == "hf-perplexity":
        from ckptavg.evaluators.hf_perplexity import HFPerplexity

        allowed = ("batch_size", "seq_len", "max_tokens", "device", "tokenizer", "dtype", "text_field")
        unknown = sorted(set(opts) - {"data", *allowed})
        if unknown:
            raise UsageError(f"hf-perplexity: unknown option {unknown[0]!r} (allowed: data, {', '.join(allowed)})")
        return HFPerplexity(Path(opts.pop("data")), **opts)
    raise UsageError(f"evaluator kind {kind!r}: expected one of {', '.join(KINDS)}")
