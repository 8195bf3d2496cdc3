"""A tiny real DeepSpeed run on CPU, for tests/test_deepspeed.py (run under ``torchrun --nproc-per-node 2``).

``python -m torch.distributed.run --nproc-per-node 2 tests/ds_train.py RUN REF --stage S --steps N --every K``
trains a small model with a tied weight, a frozen parameter and a buffer under ZeRO stage S (bf16 module weights,
fp32 master weights, torch AdamW with two parameter groups as the client optimizer), saves ``RUN/global_step<N>/`` every K steps with
``engine.save_checkpoint`` (DeepSpeed's default layout, ``latest`` and ``zero_to_fp32.py`` beside), and after each
save writes, outside the run folder, the reference: ``REF/<step>.pt`` = the fp32 master weights as DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` reconstructs them, and ``REF/<step>.module.pt`` = the module's bf16
state dict (rank 0 only).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm.torch  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(37, 12)
        self.fc1 = torch.nn.Linear(12, 29)
        self.fc2 = torch.nn.Linear(29, 12)
        self.frozen = torch.nn.Linear(12, 5)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(12, 37, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("scale", torch.tensor([0.5, 2.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.fc2(torch.relu(self.fc1(h))) * self.scale[0]
        return self.head(h) + self.frozen(h).sum(-1, keepdim=True) * 0.01


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("ref", type=Path)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to wait after each save")
    ap.add_argument("--fp32", action="store_true", help="train in fp32 (no bf16 module weights)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = Tiny()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    if not args.fp32:
        config["bf16"] = {"enabled": True}
    params = [p for p in model.parameters() if p.requires_grad]
    # two parameter groups (biases without weight decay), as most trainers set them: each group is its own flat run
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.05)
    # the CPU accelerator would compile a shared-memory all-reduce op on first use (minutes, needs a compiler): gloo does
    deepspeed.comm.torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           model_parameters=params)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    args.ref.mkdir(parents=True, exist_ok=True)
    for step in range(1, args.steps + 1):
        x = torch.randint(0, 37, (4, 6), generator=g)
        logits = engine(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 37), x.reshape(-1))
        engine.backward(loss)
        engine.step()
        if step % args.every == 0:
            engine.save_checkpoint(str(args.run))
            torch.distributed.barrier()
            if rank == 0:
                tag = f"global_step{step}"
                # without ZeRO, zero_to_fp32 has nothing to rebuild: the module's weights are what DeepSpeed keeps
                ref = (engine.module.state_dict() if args.stage == 0
                       else get_fp32_state_dict_from_zero_checkpoint(str(args.run), tag=tag))
                torch.save({k: v.clone() for k, v in ref.items()}, args.ref / f"{step}.pt")
                torch.save({k: v.clone() for k, v in engine.module.state_dict().items()}, args.ref / f"{step}.module.pt")
            torch.distributed.barrier()
            time.sleep(args.pause)


if __name__ == "__main__":
    main()
