"""Loads a Hugging Face causal LM and runs one forward over a ragged batch.

Knows nothing of scheduling: it gets requests and how many new tokens of each to compute,
writes their keys/values into the paged pool and returns the logits of the rows that
finish catching up this step (the ones that sample a token).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM

from harvest.engine.attention import ATTN_IMPLEMENTATION, AttentionMetadata, PrefillChunk
from harvest.engine.host_memory import keep_freed_memory
from harvest.engine.request import Request

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    sliding_window: int | None

    @classmethod
    def from_config(cls, config) -> ModelShape:
        config = config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=getattr(config, "sliding_window", None),
        )

    def block_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem


def load_shape(model_path: str) -> ModelShape:
    return ModelShape.from_config(AutoConfig.from_pretrained(model_path))


def resolve_dtype(dtype: str, device: str, model_path: str) -> str:
    """ "auto": the checkpoint's own dtype on CUDA (float32 where it names none we run), and
    float32 on CPU, where half-precision matmuls are slow or missing."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    saved = AutoConfig.from_pretrained(model_path).get_text_config().dtype
    name = str(saved).removeprefix("torch.") if saved is not None else "float32"
    return name if name in DTYPES else "float32"


def free_device_memory(device: str, model_path: str) -> int:
    """Bytes free on `device` once the weights are in (their files' size, before they load)."""
    if not device.startswith("cuda"):
        raise ValueError("a KV cache sized as a fraction of device memory needs CUDA; give bytes on CPU")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    return max(0, free - weights)


class ModelRunner:
    def __init__(self, model_path: str, device: str, dtype: str, num_blocks: int, block_size: int) -> None:
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.block_size = block_size
        if self.device.type == "cpu":
            keep_freed_memory()  # a CPU step's activations: reused, not mapped afresh each step
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=ATTN_IMPLEMENTATION
        ).to(self.device)
        self.model.eval()
        self.shape = ModelShape.from_config(self.model.config)
        s = self.shape
        self.kv_cache = torch.zeros(
            s.num_layers, 2, num_blocks * block_size, s.num_kv_heads, s.head_dim,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long)
        pos = torch.arange(start, end)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, requests: list[Request], num_new_tokens: list[int]):
        """Flatten the batch into input ids, positions, slots and attention metadata."""
        input_ids: list[int] = []
        positions: list[int] = []
        decode_index: list[int] = []
        decodes: list[Request] = []
        prefills: list[PrefillChunk] = []
        sample_index: list[int] = []
        for req, n in zip(requests, num_new_tokens):
            start = req.num_computed_tokens
            query_start = len(input_ids)
            input_ids += req.token_ids[start : start + n]
            positions += range(start, start + n)
            if start + n == req.num_tokens:
                sample_index.append(query_start + n - 1)
            if n == 1:
                decode_index.append(query_start)
                decodes.append(req)
            else:
                prefills.append(
                    PrefillChunk(query_start, n, start, self._slots(req.block_table, 0, start + n))
                )
        pos = torch.tensor(positions, dtype=torch.long)
        slot_mapping = self._slot_mapping(requests, num_new_tokens)
        decode_slots, decode_mask = self._decode_context(decodes)
        dev = self.device
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=slot_mapping.to(dev),
            decode_index=torch.tensor(decode_index, dtype=torch.long, device=dev),
            decode_slots=decode_slots.to(dev),
            decode_mask=decode_mask.to(dev),
            prefills=[
                PrefillChunk(c.query_start, c.query_len, c.context_len, c.slots.to(dev)) for c in prefills
            ],
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        return ids, pos.to(dev), meta, torch.tensor(sample_index, dtype=torch.long, device=dev)

    def _slot_mapping(self, requests: list[Request], num_new_tokens: list[int]) -> torch.Tensor:
        # plain Python: most rows are single decode tokens, where tensor ops cost more than they save
        bs = self.block_size
        slots: list[int] = []
        for req, n in zip(requests, num_new_tokens):
            table = req.block_table
            slots += [
                table[pos // bs] * bs + pos % bs
                for pos in range(req.num_computed_tokens, req.num_computed_tokens + n)
            ]
        return torch.tensor(slots, dtype=torch.long)

    def _decode_context(self, decodes: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded context slots of every single-token query; computed once, used by every layer."""
        if not decodes:
            return torch.empty(0, 0, dtype=torch.long), torch.empty(0, 1, 1, 0, dtype=torch.bool)
        ctx = torch.tensor([r.num_computed_tokens + 1 for r in decodes])
        max_blocks = max(len(r.block_table) for r in decodes)
        tables = torch.tensor([r.block_table + [0] * (max_blocks - len(r.block_table)) for r in decodes])
        offsets = torch.arange(self.block_size)
        slots = (tables[:, :, None] * self.block_size + offsets).flatten(1)[:, : int(ctx.max())]
        mask = torch.arange(slots.shape[1]) < ctx[:, None]
        return slots, mask[:, None, None, :]

    @torch.inference_mode()
    def execute(
        self,
        requests: list[Request],
        num_new_tokens: list[int],
        abort: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run the step; returns float32 logits [num_sampling_rows, vocab] in batch order."""
        ids, pos, meta, sample_index = self.prepare(requests, num_new_tokens)
        meta.abort = abort
        with self._attention_backends():
            out = self.model(
                input_ids=ids[None],
                position_ids=pos[None],
                use_cache=False,
                logits_to_keep=sample_index,
                harvest_batch=meta,
            )
        return out.logits[0].float()

    def _attention_backends(self):
        """SDPA's kernels for this step: on CUDA every one but cuDNN's.

        PyTorch prefers cuDNN attention on Hopper (sm90) once its bundled cuDNN is recent
        enough (torch 2.11), and cuDNN builds an execution graph for every new shape, at
        milliseconds each. A paged batch's shapes change every step (the decode context
        grows, prefill chunks differ), so that cache never warms: on an H200 the attention
        calls took 2-7 ms each, the steps of a served trace 65-210 ms where the start-up
        profile (its shapes repeated) timed 15 (docs/BENCHMARKS.md, GPU check)."""
        if self.device.type != "cuda":
            return nullcontext()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def execute_synchronized(self, requests: list[Request], num_new_tokens: list[int]) -> torch.Tensor:
        """`execute`, returning once the device is done: what a timer around it measures.
        (A step needs no such wait: its sampled ids coming back to the host are one.)"""
        logits = self.execute(requests, num_new_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return logits
