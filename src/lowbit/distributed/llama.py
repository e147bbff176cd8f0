"""Tensor parallelism for lowbit.llm's Llama decoder (Megatron layout, one all-reduce per sub-block).

Per block: the fused wqkv and w13 are column-wise (rank r keeps q_r, k_r, v_r heads and gate_r,
up_r features, so attention and SwiGLU run locally on whole heads / features); wo and w2 are
row-wise (their inputs are exactly the local heads / features) and all-reduce their outputs.
Embeddings, norms and the LM head stay replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lowbit.distributed.tp import ColwiseQuantLinear, Group, RowwiseQuantLinear
from lowbit.llm.model import Block, Transformer


def parallelize_llama_block(block: Block, group: Group = None, exact: bool = False) -> Block:
    """Shard one Block in place over `group`; returns it. Heads must divide by the world size."""
    world = dist.get_world_size(group)
    att, ffn = block.attention, block.feed_forward
    if att.n_heads % world or att.n_kv % world:
        raise ValueError(
            f"tensor parallel over {world} ranks needs n_heads={att.n_heads} and "
            f"n_kv_heads={att.n_kv} divisible by {world}"
        )
    q, kv = att.n_heads * att.head_dim, att.n_kv * att.head_dim
    ffn_dim = ffn.w2.weight.shape[1]
    # Build every shard before swapping any: a bad split leaves the block untouched.
    wqkv, wo = _colwise(att.wqkv, group, [q, kv, kv]), _rowwise(att.wo, group, exact)
    w13, w2 = _colwise(ffn.w13, group, [ffn_dim, ffn_dim]), _rowwise(ffn.w2, group, exact)
    for parent, name, new in ((att, "wqkv", wqkv), (att, "wo", wo), (ffn, "w13", w13), (ffn, "w2", w2)):
        setattr(parent, name, new)
    att.n_heads, att.n_kv = att.n_heads // world, att.n_kv // world
    return block


def parallelize_llama(model: Transformer, group: Group = None, exact: bool = False) -> Transformer:
    """Shard every block of a (quantized) Transformer in place.

    `model.setup_caches` then sizes each KV cache for the rank's local kv heads."""
    for block in model.blocks():
        parallelize_llama_block(block, group, exact)
    return model


def _colwise(linear: nn.Module, group: Group, sections: list[int]) -> ColwiseQuantLinear:
    return ColwiseQuantLinear(_weight(linear), getattr(linear, "bias", None), group, sections=sections)


def _rowwise(linear: nn.Module, group: Group, exact: bool) -> RowwiseQuantLinear:
    return RowwiseQuantLinear(_weight(linear), getattr(linear, "bias", None), group, exact=exact)


def _weight(linear: nn.Module) -> torch.Tensor:
    w = linear.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(linear).__name__} has no tensor weight to shard")
    return w
