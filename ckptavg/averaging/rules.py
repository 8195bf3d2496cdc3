"""Per-tensor rules: a glob on the tensor name decides how that tensor is averaged.

A rule is written ``GLOB=ACTION``; the first rule whose glob matches wins.

* ``latest`` — take the newest checkpoint's value, unaveraged;
* ``exclude`` — leave the tensor out of the output;
* ``half-life:H`` — average this tensor with an EMA of half-life ``H`` steps
  (e.g. a shorter half-life for ``*.norm.*``), whatever the average's method.

Non-floating tensors (integer buffers such as ``num_batches_tracked`` or
``position_ids``) always take the latest value.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

from ckptavg.errors import OptionError

__all__ = ["Rule", "parse_rule", "match_rule"]

ACTIONS = ("latest", "exclude", "half-life:H")
MAX_RULE_HALF_LIFE = 1e15  # as the EMA method's half_life


@dataclass(frozen=True)
class Rule:
    glob: str
    action: str  # "latest" | "exclude" | "ema"
    half_life: float | None = None

    def __str__(self) -> str:
        return f"{self.glob}=half-life:{self.half_life:g}" if self.action == "ema" else f"{self.glob}={self.action}"

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.glob)


def parse_rule(text: str) -> Rule:
    glob, sep, action = text.partition("=")
    glob, action = glob.strip(), action.strip()
    expected = f"GLOB=ACTION with ACTION one of {', '.join(ACTIONS)}"
    if not sep or not glob or not action:
        raise OptionError.invalid(None, "rule", text, expected)
    if action in ("latest", "exclude"):
        return Rule(glob, action)
    if action.startswith("half-life:"):
        try:
            h = float(action.split(":", 1)[1])
        except ValueError:
            h = -1.0
        if not (0 < h <= MAX_RULE_HALF_LIFE):
            raise OptionError.invalid(None, "rule", text,
                                      f"GLOB=half-life:H with H a positive number of steps, at most {MAX_RULE_HALF_LIFE:g}")
        return Rule(glob, "ema", h)
    raise OptionError.invalid(None, "rule", text, expected)


def parse_rules(texts: Iterable[str]) -> list[Rule]:
    return [parse_rule(t) for t in texts]


def match_rule(rules: Sequence[Rule], name: str) -> Rule | None:
    for rule in rules:
        if rule.matches(name):
            return rule
    return None
