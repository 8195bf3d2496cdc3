"""Reading: from files on disk to an indexed :class:`~ckptavg.reading.checkpoint.Checkpoint`.

``formats/`` holds the file formats (safetensors, both directions, and PyTorch pickles),
``fileio`` the byte reads, ``checkpoint`` the tensor index of one checkpoint, ``discover`` and
``ready`` which checkpoints a run folder holds and whether each is finished, ``steps`` and
``names`` what a file or folder name says.
"""
