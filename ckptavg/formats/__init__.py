"""Checkpoint file formats: safetensors (single and sharded) and PyTorch pickles."""

from .refs import TensorRef

__all__ = ["TensorRef"]
