"""accelerate's ``Accelerator.save_state(dir)`` folders: how to recognise one, when it is finished, and what
its name says about the step.

``save_accelerator_state`` (accelerate 1.x, ``accelerate/checkpointing.py``) writes, in this order: the
weights (``model.safetensors``, or ``pytorch_model.bin`` with ``safe_serialization=False``; further models
``model_1.safetensors`` ...), ``optimizer.bin``, ``scheduler.bin``, ``sampler.bin``/``dl_state_dict.bin``,
``scaler.pt``, and last ``random_states_<process>.pkl``; ``save_state`` then writes one
``custom_checkpoint_<i>.pkl`` per registered object. So a folder is finished once ``random_states_0.pkl`` is
whole (its zip end record written) and nothing has changed for the settle time. No ``trainer_state.json`` is
ever written.

The step: ``random_states_0.pkl`` holds accelerate's ``step``, but that is its gradient-accumulation counter
(it counts micro-batches inside ``accelerator.accumulate()``, stays 0 without it, and restarts at 0 at the end
of every epoch), not the training step, so it is never used (and the pickle, which also holds numpy random
states, is never loaded). With ``ProjectConfiguration(automatic_checkpoint_naming=True)`` folders are named
``checkpoints/checkpoint_<i>`` where i counts saves: the checkpoint reader takes it as the step and says so.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

from ckptavg.reading.fileio import zip_finished

__all__ = ["LAST_FILE", "SAVE_NUMBER_NOTE", "is_accelerate", "pending", "save_number"]

LAST_FILE = "random_states_0.pkl"
SAVE_NUMBER_NOTE = "accelerate save number in the name (checkpoint_<i> counts saves, not steps)"
_OWN = re.compile(r"^(?:random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|(?:optimizer|scheduler|sampler)(?:_\d+)?\.bin"
                  r"|dl_state_dict(?:_\d+)?\.bin)$")
# the HF Trainer (which saves through accelerate) writes these instead
_HF = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt")
_SAVE_NAME = re.compile(r"^checkpoint_(\d+)$")


def is_accelerate(names: Collection[str]) -> bool:
    """Whether a folder holding ``names`` was written by ``Accelerator.save_state``."""
    if any(n in names for n in _HF) or any(n.startswith("rng_state") for n in names):
        return False
    return any(_OWN.match(n) for n in names)


def pending(folder: Path) -> str | None:
    """Why an accelerate folder is not finished yet, or None once its last file is whole."""
    last = folder / LAST_FILE
    try:
        if zip_finished(last):
            return None
    except FileNotFoundError:
        return f"{LAST_FILE} not written yet (accelerate's save_state writes it last)"
    return f"{LAST_FILE} still being written (accelerate's save_state writes it last)"


def save_number(folder: Path) -> int | None:
    """i of an automatic ``checkpoint_<i>`` folder name, or None."""
    m = _SAVE_NAME.match(folder.name)
    return int(m.group(1)) if m else None
