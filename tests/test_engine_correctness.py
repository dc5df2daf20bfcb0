"""Greedy outputs of the engine equal transformers' own generate, for every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from harvest.engine import SamplingParams
from tests.helpers import make_engine, make_prompts, run_checked

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
MAX_TOKENS = 12


def hf_greedy(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
        outs.append(gen[0, len(p) :].tolist())
    return outs


@pytest.fixture(scope="module", params=ARCHS)
def arch_and_reference(request, tiny_models):
    model_dir = tiny_models[request.param]
    engine = make_engine(model_dir)
    prompts = make_prompts(engine)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        pytest.param({}, id="roomy"),
        # 12 blocks of 4 slots: requests must wait for blocks and get preempted
        pytest.param({"num_blocks": 26, "max_num_batched_tokens": 16}, id="tiny-pool-chunked"),
        pytest.param({"max_num_seqs": 3, "max_num_batched_tokens": 8}, id="few-seqs"),
    ],
)
def test_greedy_matches_transformers(arch_and_reference, engine_kwargs):
    model_dir, prompts, expected = arch_and_reference
    engine = make_engine(model_dir, **engine_kwargs)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    ids = [engine.add_request(p, params) for p in prompts]
    done = run_checked(engine)
    got = [done[i].token_ids for i in ids]
    assert got == expected
    assert len({tuple(g) for g in got}) > 1, "degenerate model: every prompt gave the same output"


def test_tiny_pool_forces_preemption(tiny_model):
    engine = make_engine(tiny_model, num_blocks=26, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for p in make_prompts(engine):
        engine.add_request(p, params)
    done = run_checked(engine)
    assert sum(o.num_preemptions for o in done.values()) > 0
    assert all(o.num_output_tokens == MAX_TOKENS for o in done.values())
