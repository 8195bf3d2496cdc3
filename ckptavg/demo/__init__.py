"""The demo: a small, real training run (``trainer``) that ``ckptavg demo`` starts beside the daemon.

``python -m ckptavg.demo train RUN`` runs the trainer; ``ckptavg.demo:evaluate_folder`` is the
daemon's evaluator in the demo's configuration.
"""

from ckptavg.demo.trainer import DemoConfig, evaluate, evaluate_folder, make_model, train

__all__ = ["DemoConfig", "evaluate", "evaluate_folder", "make_model", "train"]
