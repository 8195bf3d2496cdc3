"""SWA: the uniform mean of every checkpoint from a start step on."""

from __future__ import annotations

from ckptavg.averaging.methods.base import Method, Option
from ckptavg.averaging.methods.uniform import Uniform


class SWA(Uniform):
    name = "swa"
    summary = "mean of every checkpoint from the start step on"
    reference = "https://arxiv.org/abs/1803.05407 (Izmailov et al., Averaging Weights Leads to Wider Optima)"
    params = (Option("start_step", int, "SWA: average every checkpoint from this step on.", unit="steps",
                     metavar="S", low=0, high=1e18, default=0,
                     expect="an integer >= 0, at most 1e18"),)
    main_option = "start_step"
    watch_flag = "--swa-start"

    start_step: int
    weighted = False

    label = Method.label  # swa-6000, not uniform's name

    def needs_steps(self) -> bool:
        return self.start_step > 0

    def accepts(self, step: int | None) -> bool:
        return step is None or step >= self.start_step
