"""The ``python`` evaluator: call ``package.module:function`` (or ``path/to/file.py:function``) in-process.

The function is imported once. What it receives depends on its first
parameter's name: ``model_dir``/``folder``/``path`` get the candidate's model
folder (a :class:`~pathlib.Path`), ``candidate`` gets the
:class:`~ckptavg.evaluators.base.Candidate`, anything else gets the state dict
(name → CPU tensor). It returns a mapping of metric names to numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptavg.errors import UsageError
from ckptavg.evaluators.base import Candidate, EvaluationError, check_metrics

log = logging.getLogger(__name__)

__all__ = ["PythonEvaluator", "load_function"]

_FOLDER_NAMES = {"model_dir", "folder", "path", "model_path"}


def load_function(spec: str) -> Callable[..., Any]:
    """``pkg.mod:func`` or ``file.py:func`` → the function; a UsageError naming the spec otherwise."""
    module_name, sep, attr = (spec or "").rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--eval-python {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--eval-python: no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"ckptavg_user_eval_{path.stem}", path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except ImportError as e:
        raise UsageError(f"--eval-python {spec!r}: cannot import {module_name}: {e}",
                         hint="is the module on PYTHONPATH (or give a path/to/file.py)?") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise UsageError(f"--eval-python {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--eval-python {spec!r}: {module_name} has no function {attr!r}")
    return fn


class PythonEvaluator:
    name = "python"

    def __init__(self, spec: str, **kwargs: Any) -> None:
        self.spec = spec
        self.fn = load_function(spec)
        self.kwargs = kwargs
        try:
            params = list(inspect.signature(self.fn).parameters)
        except (TypeError, ValueError):
            params = []
        first = params[0] if params else ""
        self.wants = "folder" if first in _FOLDER_NAMES else "candidate" if first == "candidate" else "state_dict"

    @property
    def label(self) -> str:
        return f"python:{self.spec}"

    def evaluate(self, candidate: Candidate) -> dict[str, float]:
        arg: Any = (candidate.model_dir if self.wants == "folder" else candidate if self.wants == "candidate"
                    else candidate.state_dict())
        try:
            result = self.fn(arg, **self.kwargs)
        except EvaluationError:
            raise
        except Exception as e:
            raise EvaluationError(f"{self.spec} raised {type(e).__name__} on {candidate.name} (step {candidate.step}): "
                                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from e
        finally:
            candidate.release()
        return check_metrics(result, evaluator=self.label, candidate=candidate.name)

    def close(self) -> None:
        pass
