"""Tenants: the lease order against a real redis-server (earliest deadline class first, then
the tenant served the fewest tokens, VTC, then round-robin over that tenant's jobs), and the
keys that name tenants. Their isolation over HTTP is in test_batch_api.py."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from harvest.cli import app
from harvest.config import ConfigError, build_config
from harvest.queue import Result
from harvest.queue.store import estimated_tokens
from harvest.tenants import tenant_name


def cost(lease) -> int:
    return sum(estimated_tokens(r) for i, r in enumerate(lease.requests) if i not in lease.done)


def lease_all(store, worker: str = "w") -> list:
    leases = []
    while got := store.lease(worker, 30):
        leases += got
    return leases


def test_tenants_with_equal_backlogs_get_equal_tokens(queue_store, make_job):
    # equal backlogs in tokens, made of different requests: few long ones against many short ones
    make_job(40, shard_size=1, max_tokens=60, owner="alice")
    make_job(128, shard_size=1, max_tokens=16, owner="bob")
    backlog = {"alice": 0, "bob": 0}
    for lease in queue_store.lease("probe", 30, max_shards=1000):
        backlog[queue_store.get_job(lease.job_id).owner] += cost(lease)
    assert abs(backlog["alice"] - backlog["bob"]) / backlog["bob"] < 0.02
    queue_store.r.flushdb()  # the same backlogs again, now leased one shard per call

    make_job(40, shard_size=1, max_tokens=60, owner="alice")
    make_job(128, shard_size=1, max_tokens=16, owner="bob")
    served = {"alice": 0, "bob": 0}
    while sum(served.values()) < sum(backlog.values()) / 2:  # half of it: both still have work
        (lease,) = queue_store.lease("w", 30, max_shards=1)
        served[queue_store.get_job(lease.job_id).owner] += cost(lease)
    assert abs(served["alice"] - served["bob"]) <= 0.1 * sum(served.values()) / 2
    assert queue_store.served_tokens() == served  # the counters the lease ranks tenants by


def test_deadlines_win_over_fair_share(queue_store, make_job):
    bob_plain = make_job(4, shard_size=1, owner="bob")  # no window: after every deadline
    alice_day = make_job(4, shard_size=1, owner="alice", completion_window_s=86400)
    for _ in range(4):  # alice has now been served far more than bob
        assert queue_store.lease("w", 30)[0].job_id == alice_day
    assert queue_store.served_tokens().get("bob", 0) == 0 < queue_store.served_tokens()["alice"]
    alice_short = make_job(4, shard_size=1, owner="alice", completion_window_s=1800)
    bob_day = make_job(4, shard_size=1, owner="bob", completion_window_s=86400)
    order = [lease.job_id for lease in lease_all(queue_store)]
    # the later, shorter window first, however much its tenant had; then the day; then no window
    assert order == [alice_short] * 4 + [bob_day] * 4 + [bob_plain] * 4


def test_jobs_of_one_tenant_and_class_share_round_robin(queue_store, make_job):
    first, second = make_job(4, shard_size=1, owner="a"), make_job(4, shard_size=1, owner="a")
    assert [lease.job_id for lease in queue_store.lease("w", 30, max_shards=4)] == [first, second] * 2


def test_a_tenant_arriving_late_starts_at_the_least_counter(queue_store, make_job):
    make_job(30, shard_size=1, owner="a")
    make_job(30, shard_size=1, owner="b")
    queue_store.lease("w", 30, max_shards=20)  # a and b have each been served 10 shards' worth
    make_job(30, shard_size=1, owner="c")
    owners = [queue_store.get_job(x.job_id).owner for x in queue_store.lease("w", 30, max_shards=12)]
    # c shares from now on; idle until now, it earned no credit to take the next 10 alone
    assert owners.count("c") <= 5 and owners.count("a") >= 3 and owners.count("b") >= 3


def test_results_replace_the_estimate_and_count_toward_throughput(queue_store, make_job):
    job_id = make_job(4, shard_size=2, owner="a", completion_window_s=3600)
    assert queue_store.throughput() is None  # nothing written yet: no rate to judge by
    assert queue_store.eta(queue_store.get_job(job_id).expires_at) is None
    assert queue_store.requests_ahead(queue_store.get_job(job_id).expires_at) == 4
    (lease,) = queue_store.lease("w", 30)
    assert queue_store.served_tokens() == {"a": cost(lease)}
    results = {i: Result("completed", text="x", prompt_tokens=5, completion_tokens=7) for i in range(2)}
    assert queue_store.write_results(lease, results) == ["ok", "ok"]
    assert queue_store.write_results(lease, results) == ["dup", "dup"]  # counted once
    assert queue_store.served_tokens() == {"a": 24}
    requests_per_s, tokens_per_s = queue_store.throughput()
    assert requests_per_s > 0 and tokens_per_s == pytest.approx(12 * requests_per_s)
    assert queue_store.requests_ahead(queue_store.get_job(job_id).expires_at) == 2
    # two requests left at the rate above (or less: the same results over a longer span)
    before, deadline = queue_store.now(), queue_store.get_job(job_id).expires_at
    assert before + 2 / requests_per_s <= queue_store.eta(deadline) < deadline
    # a later deadline class counts this job as ahead of it; an earlier one does not
    assert queue_store.requests_ahead(queue_store.now() + 7200) == 2
    assert queue_store.requests_ahead(queue_store.now() + 60) == 0


def test_keys_from_flags_environment_and_file(tmp_path):
    config = build_config({"api_key": ["alice:k-1", "k-2"]})
    assert config.resolved_api_key() == {"k-1": "alice", "k-2": tenant_name("k-2")}
    assert build_config({"api_key": "k-1"}).resolved_api_key() == "k-1"  # one key: as before
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenants\nbob:k-3\n\nk-4\n")
    from_file = build_config({"api_key_file": str(keys_file), "api_key": "carol:k-5"}).resolved_api_key()
    assert from_file == {"k-3": "bob", "k-4": tenant_name("k-4")}  # the file wins, as it always has
    assert tenant_name("k-4").startswith("key-") and "k-4" not in tenant_name("k-4")
    for bad in (["alice:k 1"], ["k-1", "bob:k-1"], [":k-1"]):
        with pytest.raises(ConfigError) as err:
            build_config({"api_key": bad})
        assert "api_key" in str(err.value) and "k 1" not in str(err.value) and "k-1" not in str(err.value)
    keys_file.write_text("ok-key\nbad key\n")
    with pytest.raises(ConfigError, match="line 2") as err:
        build_config({"api_key_file": str(keys_file)}).resolved_api_key()
    assert "bad key" not in str(err.value)


def test_config_show_masks_every_key():
    result = CliRunner().invoke(app, ["config", "show"], env={"HARVEST_API_KEYS": "sk-one,team:sk-two"})
    assert result.exit_code == 0, result.output
    assert "sk-one" not in result.output and "sk-two" not in result.output
    assert yaml.safe_load(result.stdout)["api_key"] == ["***", "***"]
    repeated = CliRunner().invoke(app, ["config", "show", "--api-key", "sk-one", "--api-key", "sk-two"])
    assert yaml.safe_load(repeated.stdout)["api_key"] == ["***", "***"]


def test_jobs_queued_by_an_older_harvest_are_still_leased(queue_store, make_job):
    job_id = make_job(2, shard_size=1)
    # the layout before deadline classes: one list of the jobs with ready shards
    queue_store.r.delete(*queue_store.r.keys(f"{queue_store.prefix}:class*"))
    queue_store.r.rpush(f"{queue_store.prefix}:active", job_id)
    assert [lease.job_id for lease in queue_store.lease("w", 30, max_shards=4)] == [job_id] * 2
    assert not queue_store.r.exists(f"{queue_store.prefix}:active")
