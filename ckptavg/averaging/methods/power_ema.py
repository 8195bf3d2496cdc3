"""Power-function EMA (Karras et al. 2024, EDM2), exact over checkpoints saved at irregular steps.

EDM2 averages with a profile that grows like ``τ^γ`` over the whole run so far
(its length scales with the run: ``σ_rel`` is the profile's standard deviation
relative to the current step). Per training step ``t = 1, 2, …`` (the model
after ``t`` optimizer updates) it does::

    β(t) = (1 − 1/t)^(γ+1),   ema_t = β(t) · ema_{t−1} + (1 − β(t)) · θ_t      (β(1) = 0: ema_1 = θ_1)

ckptavg sees only the saved checkpoints ``θ_k`` at steps ``t_1 < t_2 < …``. The
checkpoint at ``t_k`` stands for the steps ``t_{k−1}+1 … t_k`` (``t_0 = 0``):
over that interval the parameter is held at ``θ_k``. With a constant ``θ``,
each step is an affine contraction towards ``θ`` (``ema_t − θ = β(t) · (ema_{t−1} − θ)``),
so the whole interval is one contraction by the product of its ``β``, which
telescopes::

    Π_{t=t_{k−1}+1}^{t_k} ((t − 1)/t)^(γ+1) = (t_{k−1}/t_k)^(γ+1)

    ema_k = a_k · ema_{k−1} + (1 − a_k) · θ_k,   a_k = (t_{k−1}/t_k)^(γ+1)

and the first fold takes ``θ_1`` whole (``t_0 = 0``: ``a_1 = 0``). This is
EDM2's own ``power_function_beta(std, t_next, t_delta) = (1 − t_delta/t_next)^(γ+1)``
with ``t_delta = t_k − t_{k−1}``. The weight the result gives the checkpoint at
``t_k`` is ``(t_k^(γ+1) − t_{k−1}^(γ+1)) / t_n^(γ+1)``: exactly what EDM2's
per-step EMA gives the steps ``t_{k−1}+1 … t_k`` together.

``γ`` from ``σ_rel`` is EDM2's: ``σ_rel² = (γ+1) / ((γ+2)² (γ+3))``, i.e. the
root ``γ ≥ 0`` of ``γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0`` (their
Algorithm 2). ``σ_rel²`` falls strictly from ``1/12`` at ``γ = 0`` (the plain
mean of every step) towards 0, so ``σ_rel ∈ (0, 1/√12]`` and ``γ ≥ 0`` map one
to one. The root is found by bisection in float64 (deterministic: no library
eigen-solver, so every machine computes the same ``γ``).

The coefficient ``a_k`` is computed in float64 from the integer steps; the
fold is ``ema.mul_(a).add_(x · (1 − a))``, one IEEE operation per step, as in
:mod:`ckptavg.averaging.methods.ema`.
"""

from __future__ import annotations

import math
from typing import Any

from ckptavg.averaging.methods.base import FoldInfo, Option, Plan, Slot
from ckptavg.averaging.methods.ema import MovingAverage
from ckptavg.errors import UsageError

__all__ = ["SIGMA_REL_MAX", "PowerEMA", "gamma_from_sigma_rel", "sigma_rel_from_gamma"]

SIGMA_REL_MAX = 1 / math.sqrt(12)  # γ = 0: the mean of every step


def _var(g: float) -> float:
    """``σ_rel(γ)²`` as EDM2 writes it, ``(γ+1) / (γ+2)² / (γ+3)``: strictly decreasing for ``γ ≥ 0``
    (for a huge ``γ`` in an order that cannot overflow)."""
    if g < 1e150:
        return (g + 1) / (g + 2) ** 2 / (g + 3)
    return (g + 1) / (g + 2) / (g + 2) / (g + 3)


def sigma_rel_from_gamma(gamma: float) -> float:
    """EDM2's closed form (``exp_to_std``): the relative standard deviation of the profile ``τ^γ``."""
    return math.sqrt(_var(float(gamma)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent ``γ ≥ 0`` with ``σ_rel(γ) = sigma_rel`` (EDM2's ``std_to_exp``), for ``0 < sigma_rel ≤ 1/√12``.

    Bisection on the monotone ``σ_rel(γ)²`` down to adjacent floats: the real
    root of EDM2's cubic, to the last bit the comparison can resolve.
    """
    s = float(sigma_rel)
    if not 0 < s <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX!r}], got {sigma_rel!r}")
    target = s * s
    # σ_rel(γ)² < 1/γ², so the root lies below 1/σ_rel
    lo, hi = 0.0, min(1 / s, 1e300) + 1.0
    if target == 0.0:
        return hi
    while True:
        mid = lo + (hi - lo) / 2
        if mid <= lo or mid >= hi:
            break
        if _var(mid) > target:
            lo = mid
        else:
            hi = mid
    # of the two adjacent floats, the one whose σ_rel² is nearer the target
    return lo if abs(_var(lo) - target) <= abs(_var(hi) - target) else hi


class PowerEMA(MovingAverage):
    name = "power-ema"
    summary = ("power-function EMA (EDM2): a profile ∝ τ^γ over the whole run, its width σ_rel relative to "
               "the step; exact over irregular checkpoint steps")
    reference = "https://arxiv.org/abs/2312.02696 (Karras et al., EDM2: power-function EMA, Eq. 127 / Alg. 2)"
    params = (
        Option("sigma_rel", float, "Power EMA: relative std of the averaging profile (EDM2's σ_rel; 0.05, 0.1 are "
               "typical).", metavar="S", low=0, low_open=True, high=SIGMA_REL_MAX,
               expect=f"a number in (0, {SIGMA_REL_MAX:.6f}] (1/√12, the mean of every step)"),
        Option("gamma", float, "Power EMA: the exponent γ of the profile τ^γ (instead of --sigma-rel).",
               metavar="G", low=0, expect="a number >= 0"),
    )
    main_option = "sigma_rel"
    one_of = (("sigma_rel", "gamma"),)

    sigma_rel: float
    gamma: float

    def setup(self) -> None:
        self._by_gamma = self.sigma_rel is None
        if self._by_gamma:
            self.gamma = float(self.gamma)
            self.sigma_rel = sigma_rel_from_gamma(self.gamma)
        else:
            self.sigma_rel = float(self.sigma_rel)
            self.gamma = gamma_from_sigma_rel(self.sigma_rel)

    def options(self) -> dict[str, Any]:
        given = "gamma" if self._by_gamma else "sigma_rel"
        return {given: getattr(self, given), "sigma_rel" if self._by_gamma else "gamma":
                self.sigma_rel if self._by_gamma else self.gamma}

    def label(self) -> str:
        if self._by_gamma:
            return f"{self.name}-gamma-{self.gamma:g}"
        return super().label()

    def needs_steps(self) -> bool:
        return True

    def coefficient(self, last_step: int, step: int) -> float:
        """``a = (t_{k−1}/t_k)^(γ+1)``, the weight kept by the running average (float64)."""
        return (last_step / step) ** (self.gamma + 1.0)

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        assert info.step is not None
        if info.step < 0:
            raise UsageError(f"power-EMA needs training steps >= 0 (the number of updates done); got step {info.step}")
        if slot.count == 0:
            return Plan(first=True)
        assert slot.last_step is not None
        if info.step <= slot.last_step:
            raise UsageError(f"power-EMA needs increasing steps; got step {info.step} after {slot.last_step}")
        a = self.coefficient(slot.last_step, info.step)
        return Plan(first=False, a=a, b=1.0 - a)
