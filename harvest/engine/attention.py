"""Paged attention plugged into transformers' attention-function registry.

The model code stays transformers'; every attention layer calls `paged_attention`, which
writes the step's new keys/values into our block pool and attends each sequence over its
own blocks. The batch is ragged and flattened to one row: decode tokens are attended in
one padded call, prefill chunks one sequence at a time (their queries differ in length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "harvest_paged"


class LayerAbort(Exception):
    """Raised at a layer boundary to abandon the step in flight (see `AttentionMetadata.abort`)."""


@dataclass
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the flattened batch
    query_len: int
    context_len: int  # tokens already in the cache before this chunk
    slots: torch.Tensor  # [context_len + query_len] cache slots, in position order


@dataclass
class AttentionMetadata:
    kv_cache: torch.Tensor  # [layers, 2, num_slots, kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's k/v is written
    decode_index: torch.Tensor  # [num_decodes] positions in the batch of single-token queries
    decode_slots: torch.Tensor  # [num_decodes, max_context] context slots, padded
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_context] True where attended
    prefills: list[PrefillChunk]
    abort: object = None  # callable returning True to abandon the step at the next layer

    @property
    def num_decodes(self) -> int:
        return self.decode_index.numel()


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    harvest_batch: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    meta = harvest_batch
    if meta is None:
        raise RuntimeError("paged attention called without harvest_batch metadata")
    if meta.abort is not None and meta.abort():
        raise LayerAbort
    k_cache, v_cache = meta.kv_cache[module.layer_idx]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1))

    q = query[0]  # [heads, tokens, head_dim]
    out = torch.empty_like(q.transpose(0, 1))  # [tokens, heads, head_dim]
    if meta.num_decodes:
        qd = q[:, meta.decode_index].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, d]
        shape = (*meta.decode_slots.shape, *k_cache.shape[1:])
        flat = meta.decode_slots.flatten()
        # index_select is several times faster than advanced indexing for this gather on CPU
        kd = k_cache.index_select(0, flat).view(shape).transpose(1, 2)  # [n, kv_heads, ctx, d]
        vd = v_cache.index_select(0, flat).view(shape).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=True
        )
        out[meta.decode_index] = od.squeeze(2)
    for chunk in meta.prefills:
        start, n, ctx = chunk.query_start, chunk.query_len, chunk.context_len
        qp = q[:, start : start + n].unsqueeze(0)
        kp = k_cache.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        vp = v_cache.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        if ctx == 0:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=True)
        else:  # causal, aligned to the end: query i sees keys 0..ctx+i
            mask = torch.ones(n, ctx + n, dtype=torch.bool, device=q.device).tril(diagonal=ctx)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[start : start + n] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
