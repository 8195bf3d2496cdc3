"""BatchNorm recalibration for averaged weights: recompute running statistics before evaluating.

Averaging weights does not average activations: the running means and variances stored beside
averaged convolution weights (themselves averages of each checkpoint's statistics) do not describe
the averaged network, and a CNN evaluated with them can look far worse than it is. SWA therefore
recomputes them with one pass over training data (Izmailov et al. 2018, "Averaging Weights Leads
to Wider Optima and Better Generalization", https://arxiv.org/abs/1803.05407), as
``torch.optim.swa_utils.update_bn`` does. :func:`update_bn` is that procedure, plus ``max_batches``,
dict batches and one-line errors; :func:`with_bn_recalibration` wraps an evaluation function for
the ``python`` evaluator.

Example for a CNN, a module ``my_eval.py`` that the ``python`` evaluator calls as
``my_eval.py:evaluate`` (its parameter is not a folder name, so it receives the state dict)::

    import torch, torchvision
    from ckptavg.evaluators.bn import with_bn_recalibration

    train_loader = torch.utils.data.DataLoader(train_set, batch_size=256, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=512)

    def build_model():
        return torchvision.models.resnet18(num_classes=10).cuda()

    def accuracy(model):
        model.eval()
        right = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                right += (model(x.cuda()).argmax(1) == y.cuda()).sum().item()
                total += len(y)
        return {"val_acc": right / total}

    # state_dict (or a Candidate) -> {"val_acc": ...}, statistics recomputed on 50 training batches
    evaluate = with_bn_recalibration(accuracy, build_model, train_loader, max_batches=50)
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ckptavg.errors import UsageError
from ckptavg.evaluators.base import Candidate, EvaluationError

__all__ = ["update_bn", "with_bn_recalibration"]

log = logging.getLogger(__name__)


def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None, *,
              max_batches: int | None = None) -> int:
    """Recompute the running statistics of every BatchNorm layer of ``model`` from ``loader``.

    The arguments are in the order of :func:`torch.optim.swa_utils.update_bn` (``loader, model, device``).

    The statistics are reset and then accumulated as a cumulative (equal-weight) average over the
    batches (``momentum=None``), with the model in train mode and without gradients; each layer's
    momentum and the model's train/eval mode are restored afterwards. Batches may be tensors,
    ``(input, target, ...)`` tuples or lists (the first element is the input), or dicts (passed as
    ``model(**batch)``). Tensors are moved to ``device`` when one is given.

    Returns the number of batches forwarded: 0, with no forward pass, for a model without
    BatchNorm layers that track running statistics. A loader that yields nothing raises
    :class:`EvaluationError` and leaves the statistics as they were.
    """
    if isinstance(loader, nn.Module) and not isinstance(model, nn.Module):
        raise UsageError("update_bn(loader, model): the model was passed first; the order is torch's "
                         "(torch.optim.swa_utils.update_bn(loader, model, device))")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise UsageError(f"update_bn: max_batches={max_batches!r} must be a positive integer or None")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    batches = iter(loader) if max_batches is None else itertools.islice(loader, max_batches)
    try:
        first = next(batches)
    except StopIteration:
        raise EvaluationError("update_bn: the loader yielded no batches; the BatchNorm statistics were left as they "
                              "were", hint="pass a loader over (a part of) the training data") from None
    t0 = time.perf_counter()
    momenta = {m: m.momentum for m in layers}
    was_training = model.training
    n = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for batch in itertools.chain([first], batches):
                _forward(model, batch, device, n)
                n += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    log.info("update_bn: recomputed %d BatchNorm layer(s) over %d batch(es) in %.1f s", len(layers), n,
             time.perf_counter() - t0)
    return n


def with_bn_recalibration(
    evaluate_fn: Callable[[nn.Module], Mapping[str, float]],
    build_model: Callable[[], nn.Module],
    loader: Iterable[Any],
    max_batches: int | None = None,
) -> Callable[[Mapping[str, torch.Tensor] | Candidate], Mapping[str, float]]:
    """``state_dict -> metrics``: load into ``build_model()``, recompute BatchNorm statistics, ``evaluate_fn(model)``.

    The returned function also accepts a :class:`Candidate` (its ``state_dict()`` is used). Inputs
    are moved to the device of the model's first parameter. Missing or unexpected tensor names
    raise :class:`EvaluationError` naming them.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise UsageError(f"with_bn_recalibration: max_batches={max_batches!r} must be a positive integer or None")

    def evaluate(state: Mapping[str, torch.Tensor] | Candidate) -> Mapping[str, float]:
        state_dict = state.state_dict() if isinstance(state, Candidate) else state
        model = build_model()
        try:
            result = model.load_state_dict(dict(state_dict), strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise EvaluationError(f"with_bn_recalibration: the weights do not fit build_model(): {exc}",
                                  hint="build_model must return the architecture that was trained") from exc
        if result.missing_keys or result.unexpected_keys:
            parts = []
            if result.missing_keys:
                parts.append(f"missing {_names(result.missing_keys)}")
            if result.unexpected_keys:
                parts.append(f"unexpected {_names(result.unexpected_keys)}")
            raise EvaluationError(f"with_bn_recalibration: the weights do not fit build_model(): {'; '.join(parts)}",
                                  hint="build_model must return the architecture that was trained")
        param = next(itertools.chain(model.parameters(), model.buffers()), None)
        update_bn(loader, model, None if param is None else param.device, max_batches=max_batches)
        return evaluate_fn(model)

    return evaluate


def _forward(model: nn.Module, batch: Any, device: torch.device | str | None, index: int) -> None:
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise EvaluationError(f"update_bn: batch {index} is an empty {type(batch).__name__}")
        batch = batch[0]
    try:
        if isinstance(batch, Mapping):
            model(**{k: _to(v, device) for k, v in batch.items()})
        else:
            model(_to(batch, device))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise EvaluationError(f"update_bn: the forward pass on batch {index} failed: {type(exc).__name__}: {exc}",
                              hint="the loader must yield what the model's forward takes: a tensor, "
                                   "(input, target) or a dict of keyword arguments") from exc


def _to(value: Any, device: torch.device | str | None) -> Any:
    return value.to(device) if device is not None and isinstance(value, torch.Tensor) else value


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
