"""Synthetic Llama-layout checkpoints for the benchmarks.

Each checkpoint is a folder ``checkpoint-<step>/`` written the way
``transformers``' ``save_pretrained`` writes a Llama model: bf16 tensors named
``model.layers.N.self_attn.q_proj.weight`` …, split into several
``model-0000i-of-0000n.safetensors`` shards, a ``model.safetensors.index.json``
and a ``config.json``. The dimensions are scaled so that one checkpoint holds
about the requested number of bytes.

Generation is cheap: one random base and one random drift per shard (drawn
once), and for every step the base scaled a little plus a growing multiple of a
shifted window of the drift (a view, no copy), so values drift from step to step
and any average differs from every input.
Only one shard's tensors are in memory at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STEP_INTERVAL", "LlamaShape", "generate", "shape_for", "tensor_layout"]

STEP_INTERVAL = 1000  # steps between checkpoints: checkpoint-1000, checkpoint-2000, ...


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a (scaled) Llama model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self) -> dict:
        """A ``config.json`` that ``transformers.LlamaConfig`` accepts."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 10000.0,
        }


def tensor_layout(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order ``save_pretrained`` writes them."""
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden * shape.kv_heads // shape.heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for n in range(shape.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
            (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return out


def layout_bytes(shape: LlamaShape) -> int:
    """Bytes of one bf16 checkpoint of this shape."""
    return 2 * sum(math.prod(s) for _, s in tensor_layout(shape))


def shape_for(nbytes: int) -> LlamaShape:
    """A Llama shape of about ``nbytes`` (bf16): the hidden size whose depth comes closest to
    Llama's proportions (about ``hidden / 96`` layers), with as many layers as fill the size."""
    best, best_score = None, float("inf")
    for hidden in (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096):
        vocab = 32000 if nbytes >= 256 * 2**20 else 4096
        heads = max(1, hidden // 64)
        kv_heads = max(1, heads // 4)
        inter = 256 * math.ceil(hidden * 8 / 3 / 256)
        kv = hidden * kv_heads // heads
        per_layer = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden + 2 * hidden)
        fixed = 2 * (2 * vocab * hidden + hidden)
        layers = round((nbytes - fixed) / per_layer)
        score = abs(math.log(max(layers, 1) / (hidden / 96)))
        if layers >= 2 and score < best_score:
            best, best_score = LlamaShape(hidden, inter, layers, heads, kv_heads, vocab), score
    if best is None:
        raise ValueError(f"--size {nbytes} bytes is too small for a Llama layout (at least ~4 MB)")
    return best


def _shards(layout: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout:
        nb = 2 * math.prod(shape)
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    return shards


def generate(root: Path, nbytes: int, k: int, *, seed: int = 0, shards: int = 4) -> list[Path]:
    """Write ``k`` checkpoints of about ``nbytes`` each under ``root``; return their folders
    (``checkpoint-1000`` … in step order). Every file is fsynced, so that the page cache
    can later be dropped with ``posix_fadvise`` (dirty pages cannot be)."""
    import torch
    from safetensors.torch import save_file

    from ckptavg.writing.atomic import fsync_path

    shape = shape_for(nbytes)
    layout = tensor_layout(shape)
    total = layout_bytes(shape)
    groups = _shards(layout, max(1, math.ceil(total / shards)))
    n = len(groups)
    folders = [root / f"checkpoint-{STEP_INTERVAL * (j + 1)}" for j in range(k)]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    gen = torch.Generator().manual_seed(seed)
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        base, drift = {}, {}
        for name, shp in group:
            numel = math.prod(shp)
            if len(shp) == 1:  # RMSNorm weights: around 1
                base[name] = (1.0 + 0.05 * torch.randn(shp, generator=gen)).to(torch.bfloat16)
            else:
                base[name] = (0.02 * torch.randn(shp, generator=gen)).to(torch.bfloat16)
            # one noise vector a little longer than the tensor: step j uses the window at offset 97 j
            drift[name] = (0.01 * torch.randn(numel + 97 * k, generator=gen)).to(torch.bfloat16)
            weight_map[name] = fname
        for j, folder in enumerate(folders):
            # step j: the base shrunk a little plus a shifted window of the drift (no copy), in bf16
            scale = 1.0 - 0.03 * j
            state = {name: torch.add(b.mul(scale), drift[name][97 * j: 97 * j + b.numel()].view(b.shape), alpha=1.0 + j)
                     for name, b in base.items()}
            path = folder / fname
            save_file(state, str(path), metadata={"format": "pt"})
            fsync_path(path)
            del state
        del base, drift
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for folder in folders:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
        for name in ("model.safetensors.index.json", "config.json"):
            fsync_path(folder / name)
    return folders

