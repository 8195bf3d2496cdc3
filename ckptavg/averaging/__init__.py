"""Averaging: the methods' math, per-tensor rules, the :class:`Average`, the streaming engine,
where accumulators live (memory, pinned memory, the disk store), and the one-shot driver."""
