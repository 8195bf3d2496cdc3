"""What a file or folder name says: a staging or hidden name, a weight file, a side file never unpickled.

Both discovery (which entries of a run folder are checkpoints) and the checkpoint reader (which files
of a checkpoint hold its weights) decide by these rules, so they live here, below both.
"""

from __future__ import annotations

__all__ = ["DCP_MARKERS", "PICKLE_SUFFIXES", "SIDE_FILES", "WEIGHT_SUFFIXES", "is_noise", "is_side_file"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# a torch.distributed.checkpoint folder: its chunk files, or accelerate's model folder of them
DCP_MARKERS = (".distcp", "pytorch_model_fsdp_0")
# pickles of arbitrary objects written beside the weights: never unpickled
SIDE_FILES = frozenset({"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "meta.pt",
                        ".metadata"})
_SIDE_PREFIXES = ("rng_state", "optimizer", "scheduler")


def is_side_file(name: str) -> bool:
    """Optimizer, scheduler, RNG and training-argument files saved beside the weights."""
    return name in SIDE_FILES or name.startswith(_SIDE_PREFIXES)


def is_noise(name: str) -> bool:
    """Names that writers use while a checkpoint is not final yet, and hidden files."""
    return (
        name.startswith((".", "tmp-", "tmp_"))  # hidden; HF Trainer stages as tmp-checkpoint-N
        or name.endswith((".tmp", ".partial", ".incomplete"))
        or ".orbax-checkpoint-tmp" in name
        or ".ckptavg-tmp-" in name
    )
