"""A tiny real HF Trainer run under DeepSpeed on CPU, for tests/test_deepspeed.py (under ``torchrun
--nproc-per-node 2``): ``python -m torch.distributed.run --nproc-per-node 2 tests/hf_ds_train.py OUT STAGE``
trains a 1-layer GPT-2 (tied head) for 4 steps with bf16 and ZeRO stage STAGE, saving ``OUT/checkpoint-2/`` and
``OUT/checkpoint-4/`` as the Trainer does (its own ``model.safetensors`` beside ``latest`` and ``global_stepN/``)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed.comm.torch  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

# the CPU accelerator would compile a shared-memory all-reduce op on first use (minutes, needs a compiler): gloo does
deepspeed.comm.torch.build_shm_op = lambda: None


def main() -> None:
    out, stage = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(32)]
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True}
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=4, save_steps=2,
                             logging_steps=100, deepspeed=ds, bf16=True, report_to=[], ddp_backend="gloo", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data).train()


if __name__ == "__main__":
    main()
