"""A tiny FSDP2 training run for tests/test_dcp.py, started with ``torchrun --nproc-per-node 2`` (gloo, CPU).

Every ``--every`` steps each rank saves its shards with ``torch.distributed.checkpoint.save`` into
``RUN/step-N/`` the way torchtitan lays a checkpoint out (model keys at top level, then ``optimizer``,
``lr_scheduler`` and ``train_state`` entries), and rank 0 writes the full (gathered) model state dict to
``REF/step-N.pt`` as the test's reference, outside the run folder.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)  # 11 rows over 2 ranks: uneven shards (6 + 5)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)  # one row over 2 ranks: rank 1's shard is empty

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(ids))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("ref", type=Path)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to wait after each save")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Tiny()
    fully_shard(model.block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, 11, (4, 5), generator=g)
        loss = model(ids).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.every == 0:
            state = {
                **get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, opt,
                                                      options=StateDictOptions(flatten_optimizer_state_dict=True)),
                "lr_scheduler": {"last_epoch": step},
                "train_state": {"step": step, "ntokens_seen": step * 40},
            }
            dcp.save(state, checkpoint_id=str(args.run / f"step-{step}"))
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                args.ref.mkdir(parents=True, exist_ok=True)
                tmp = args.ref / f".step-{step}.pt.tmp"
                torch.save(full, tmp)
                os.replace(tmp, args.ref / f"step-{step}.pt")
            time.sleep(args.pause)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
