"""The prefix bench's pieces on the tiny engine (its --quick run takes minutes on the CI box)."""

from __future__ import annotations

import math

from workloads.bench import prefix


def test_bench_jobs_share_their_prefix_and_the_unshared_job_does_not(queue_engine):
    tok = queue_engine.tokenizer
    block = queue_engine.block_manager.block_size
    for kind in ("mc_eval", "classify"):
        prompts = prefix._prompts(kind)
        assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)  # no repeats: dedup plays no part
        ids = [tok.encode(p) for p in prompts]
        assert ids[0][: 8 * block] == ids[-1][: 8 * block]  # at least eight whole blocks in common
    unshared = prefix._unshared(prefix._prompts("classify"))
    assert len({tuple(tok.encode(p)[:block]) for p in unshared}) == len(unshared)


def test_offline_rate_reports_hits_only_where_prompts_share_a_prefix(queue_engine):
    shared = [f"Run shared.\n{prefix.INSTRUCTION}Text: ticket {i}\nLabel:" for i in range(6)]
    rate, hit = prefix.offline_rate(queue_engine, shared, max_tokens=2, ordered=True)
    assert rate > 0 and hit > 0.5
    _, cold = prefix.offline_rate(queue_engine, prefix._unshared(shared), max_tokens=2, ordered=True)
    assert cold < 0.1


def test_online_ttft_and_the_spread(queue_engine):
    ttfts = prefix.online_ttft(queue_engine, prefix.INSTRUCTION, ["Where is my parcel?", "Refund please"])
    assert len(ttfts) == 2 and all(math.isfinite(t) and t > 0 for t in ttfts)
    assert prefix._spread([1.0, 3.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert prefix._pct([4.0, 1.0, 3.0, 2.0], 0.99) == 4.0


def test_placement_by_prompt_computes_each_distinct_request_once():
    lines = prefix.spread_job(16)
    by_input = prefix.placement_counts(lines, 16, by_prompt=False)
    placed = prefix.placement_counts(lines, 16, by_prompt=True)
    assert by_input["lines"] == placed["lines"] == 40 and placed["distinct_requests"] == 32
    assert placed["computed_requests"] == 32 < by_input["computed_requests"]  # copies spread over shards
    assert all(placed["prefix_shards"][k] <= by_input["prefix_shards"][k] for k in placed["prefix_shards"])
