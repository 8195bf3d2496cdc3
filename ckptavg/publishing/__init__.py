"""Publishing and reporting: the Hugging Face Hub publisher and ``ckptavg report`` (which reads the
daemon's ``metrics.jsonl``)."""
