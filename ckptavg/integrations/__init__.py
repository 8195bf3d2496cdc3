"""Optional trainer integrations: pull a worker toward the elastic centre that ``ckptavg centre`` publishes.

* :func:`pull_toward_centre` — for any training loop: ``x ← x − α (x − x̃)`` in place when a newer centre
  has been published;
* :class:`~ckptavg.integrations.hf.CentrePullCallback` — a ``transformers.TrainerCallback``
  (``from ckptavg.integrations.hf import CentrePullCallback``);
* :class:`~ckptavg.integrations.lightning.CentrePullLightningCallback` — a Lightning ``Callback``
  (``from ckptavg.integrations.lightning import CentrePullLightningCallback``).

The core never imports this package; the callbacks import transformers / lightning only when their
modules are imported.
"""

from __future__ import annotations

from ckptavg.integrations.pull import PullState, centre_version, pull_toward_centre

__all__ = ["PullState", "centre_version", "pull_toward_centre"]
