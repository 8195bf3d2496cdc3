"""Checkpoint file formats: safetensors (single and sharded) and PyTorch pickles."""

from ckptavg.reading.formats.refs import TensorRef

__all__ = ["TensorRef"]
