"""The service across two Ray nodes on this machine (`ray.cluster_utils.Cluster`), started
as an operator starts it (`harvest up --address` with a config file): one worker per node, a
shard taken over across nodes with its KV checkpoint restored from the dead worker's node
keeper, a node drained mid-job (its requests resume on the other node from the checkpoints
it shipped to the head's keeper), a whole node lost mid-job without losing an offline
request, and `harvest down` leaving the cluster it did not start.

A pytest process holds one Ray (the session's `ray_cluster` fixture) and a driver cannot
join a second one, so the cluster runs in a child process (this file run as a script). The
child drives the scenarios in order and writes what it saw as JSON; each test below judges
one part of it. Each node has one CPU and a worker takes one, so Serve puts one worker on
each node, and a replaced worker lands on the node its predecessor left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny"
TAKEOVER_PROMPTS = [f"a long tale of the river, part {i}" for i in range(4)]
TAKEOVER_TOKENS = 512  # 32 blocks of 16: checkpoints ship while it decodes
DRAIN_PROMPTS = [f"the weir in spring, verse {i}" for i in range(4)]
DRAIN_TOKENS = 900  # ~1,000 steps: the drain must land while the shard runs, on a fast box too
NODE_LOSS_PROMPTS = [f"the mill by night, chapter {i}" for i in range(8)]
NODE_LOSS_TOKENS = 200
CHILD_TIMEOUT_S = 540


# ---------------------------------------------------------------------- the child: the cluster


def _wait(what: str, ready: Callable[[], Any], timeout_s: float, period_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while not (value := ready()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(period_s)
    return value


def _holder(status_fn: Callable[[], dict[str, Any]], job_id: str) -> dict[str, Any] | None:
    for name, s in status_fn()["workers"].items():
        if any(k.startswith(job_id) for k in s.get("shards", [])):
            return {**s, "name": name}
    return None


def _stream_online(base: str, prompt: str, max_tokens: int, started: threading.Event, seen: dict) -> None:
    """One streamed online request; `started` is set at its first chunk, `seen` gets its status
    and the completion tokens its usage chunk reports."""
    import httpx

    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=180) as response:
        seen["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: {"):
                started.set()
                if usage := json.loads(line.removeprefix("data: ")).get("usage"):
                    seen["tokens"] = usage["completion_tokens"]


def drain_a_node(base: str, client: Any, keepers: dict[str, Any], node_id: str, mark: Callable) -> dict:
    """Drain the worker of `node_id` while it holds a shard and streams an online request: its
    requests must resume on another worker from the checkpoints it shipped to the head's keeper
    (its own node's keeper is killed once they are handed back, as the node would go), online
    requests in flight and new ones are served, and it leaves (Serve replaces it)."""
    import httpx
    import ray

    from harvest import service

    _wait("both workers back", lambda: len(service.status()["workers"]) == 2, 120, 0.2)
    mark("drain_ready")
    before = {n: s["totals"]["restored_tokens"] for n, s in service.status()["workers"].items()}
    job = client.submit(DRAIN_PROMPTS, model=MODEL_NAME, max_tokens=DRAIN_TOKENS, temperature=0,
                        shard_size=2, defaults={"ignore_eos": True})  # fmt: skip

    def holder() -> dict[str, Any] | None:
        for name, s in service.status()["workers"].items():
            if s["node_id"] == node_id and any(k.startswith(job.id) for k in s["shards"]):
                return {**s, "name": name}
        return None

    try:
        victim = _wait("the node's worker to lease a shard", holder, 60)
    except TimeoutError as exc:  # say who held what
        workers = {n: {k: s.get(k) for k in ("node_id", "shards", "offline_enabled", "healthy", "draining")}
                   for n, s in service.status()["workers"].items()}  # fmt: skip
        raise TimeoutError(f"{exc}: node {node_id}, workers {workers}, job {client.get(job.id)}") from None
    keeper = keepers[node_id]
    shipped = ray.get(keeper.stats.remote())["bytes_put"]
    _wait("a checkpoint at the node's keeper",
          lambda: ray.get(keeper.stats.remote())["bytes_put"] > shipped, 60)  # fmt: skip
    online = [({}, threading.Event()) for _ in range(2)]  # least connections: one on each worker
    threads = [threading.Thread(target=_stream_online, args=(base, f"still streaming {i}", 200, started, got))
               for i, (got, started) in enumerate(online)]  # fmt: skip
    for thread in threads:
        thread.start()
    for _, started in online:
        assert started.wait(60), "an online request never started"
    victim = holder()
    assert victim is not None, "the shard finished before the drain: make it longer"
    mark("drain_start")
    start = time.monotonic()
    answer = service.drain(node_id[:12], reason="test: spot notice")
    body = {"model": MODEL_NAME, "prompt": "during the drain", "max_tokens": 6, "ignore_eos": True}
    during = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    states: list[dict[str, Any]] = []
    released_s = None

    def left() -> bool:
        nonlocal released_s
        worker = service.status()["workers"].get(victim["name"])
        if worker is None:
            return True
        if (state := worker.get("draining")) and state["state"] != "draining":
            if released_s is None:  # its shards are back in the queue
                released_s = time.monotonic() - start
                ray.kill(keeper, no_restart=True)  # the node's checkpoints die with it from here on
            states.append(state)
        return False

    _wait("the drained worker to leave", left, 120, 0.1)
    left_s = time.monotonic() - start
    mark("drain_left")
    for thread in threads:
        thread.join(timeout=120)
    client.wait(job.id, timeout=240, progress=False)
    mark("drain_done")
    # the CLI with an id that names nothing: a clear error, and nothing drained
    cli = [sys.executable, "-c", "from harvest.cli import app; app()", "drain", "no-such-worker",
           "--address", ray.get_runtime_context().gcs_address]  # fmt: skip
    unknown = subprocess.run(cli, capture_output=True, text=True, timeout=120, cwd=REPO)
    _wait("the drained worker's replacement", lambda: len(service.status()["workers"]) == 2, 120, 0.2)
    workers = service.status()["workers"]
    return {
        "cli_unknown": {"code": unknown.returncode, "output": unknown.stdout + unknown.stderr},
        "victim": victim["name"],
        "victim_shards": victim["shards"],
        "answer": answer,
        "last_state": states[-1] if states else None,
        "released_s": released_s,
        "left_s": left_s,
        "online_during": during.json() if during.status_code == 200 else during.text,
        "online_in_flight": [got for got, _ in online],
        "restored_before": before,
        "workers": {n: {"node_id": s["node_id"], "totals": s["totals"]} for n, s in workers.items()},
        "job": client.get(job.id).to_dict(),
        "rows": client.results(job.id).to_pylist(),
    }


@dataclass
class Run:
    """What the scenarios share: the cluster, the service's endpoint and queue, and a `mark`
    that times each step."""

    cluster: Any  # ray.cluster_utils.Cluster
    second: Any  # its second node
    base: str  # the service's HTTP endpoint
    client: Any  # a HarvestClient of the service's Redis
    env: dict[str, str]  # the `harvest` command's environment
    mark: Callable[[str], None]

    def harvest(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """`python -m harvest ARGS` against this cluster, as an operator runs it."""
        command = [sys.executable, "-m", "harvest", *args, "--address", self.cluster.address]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s)


def start_service(run: Run, model: str, work: Path, port: int) -> None:
    """`harvest up --address` with a config file: two workers (one CPU each, so one a node)
    and the queue options that make a takeover quick."""
    import yaml

    # one shard at a time, so the idle worker takes the next; leases that lapse in 5 s
    queue = {"visibility_timeout_s": 5, "progress_interval_s": 0.1, "idle_poll_s": 0.05, "max_shards": 1}
    config = {"model": model, "served_model_name": [MODEL_NAME], "workers": 2, "port": port, "queue": queue}
    (work / "harvest.yaml").write_text(yaml.safe_dump(config))
    up = run.harvest("up", "--config", str(work / "harvest.yaml"))
    assert up.returncode == 0, f"harvest up failed:\n{up.stdout}\n{up.stderr}"
    run.mark("service")


def online(run: Run, seen: dict[str, Any]) -> None:
    """Serve one completion; `harvest status` lists a worker on each node."""
    import httpx
    import ray

    from actors.checkpoint_keeper import keeper_name
    from harvest import service
    from harvest.names import NAMESPACE
    from tests.helpers import wait_healthy

    wait_healthy(run.base, 60)
    body = {"model": MODEL_NAME, "prompt": "hello across nodes", "max_tokens": 6, "ignore_eos": True}
    seen["online"] = httpx.post(f"{run.base}/v1/completions", json=body, timeout=60).json()
    status = run.harvest("status", "--json")
    assert status.returncode == 0, status.stderr
    seen["workers_at_start"] = {n: s["node_id"] for n, s in json.loads(status.stdout)["workers"].items()}
    where = service.controller_handle().__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
    seen["controller_node"] = ray.get(where, timeout=30)
    # each node's keeper is a process of its own, started with its worker: wait for both,
    # or the first checkpoints reach a keeper only after the shard is done
    keepers = [ray.get_actor(keeper_name(n), namespace=NAMESPACE) for n in seen["nodes"].values()]
    ray.get([k.stats.remote() for k in keepers], timeout=120)
    run.mark("online")


def takeover(run: Run, seen: dict[str, Any]) -> None:
    """SIGKILL the worker holding the only shard: the other node's worker takes it over."""
    import ray

    from actors.checkpoint_keeper import keeper_name
    from harvest import service
    from harvest.names import NAMESPACE

    job = run.client.submit(TAKEOVER_PROMPTS, model=MODEL_NAME, max_tokens=TAKEOVER_TOKENS,
                            temperature=0, shard_size=len(TAKEOVER_PROMPTS),
                            defaults={"ignore_eos": True})  # fmt: skip
    victim = _wait("a worker to lease the shard", lambda: _holder(service.status, job.id), 60)
    run.mark("leased")
    keeper = ray.get_actor(keeper_name(victim["node_id"]), namespace=NAMESPACE)
    _wait("a checkpoint at the victim's keeper",
          lambda: ray.get(keeper.stats.remote())["bytes_put"] > 0, 60)  # fmt: skip
    run.mark("checkpointed")
    victim = _holder(service.status, job.id)
    assert victim is not None, "the shard finished before the kill: make it longer"
    seen["takeover"] = {"victim": victim["name"], "victim_node": victim["node_id"],
                        "victim_keeper": ray.get(keeper.stats.remote())}  # fmt: skip
    os.kill(victim["pid"], signal.SIGKILL)
    run.mark("takeover_kill")
    run.client.wait(job.id, timeout=180, progress=False)
    run.mark("takeover_done")
    seen["takeover"]["job"] = run.client.get(job.id).to_dict()
    seen["takeover"]["rows"] = run.client.results(job.id).to_pylist()
    status = service.status()
    seen["takeover"]["workers"] = {n: {"node_id": s["node_id"], "totals": s["totals"]}
                                   for n, s in status["workers"].items()}  # fmt: skip
    seen["takeover"]["deaths"] = status["deaths"]

    def replaced() -> bool:  # the dead one gone from the view, its replacement in it
        workers = service.status()["workers"]
        return len(workers) == 2 and victim["name"] not in workers

    _wait("both workers back", replaced, 120, 0.2)
    run.mark("replaced")


def drain(run: Run, seen: dict[str, Any]) -> None:
    """Drain the second node mid-job (`drain_a_node`)."""
    import ray

    from actors.checkpoint_keeper import keeper_name
    from harvest.names import NAMESPACE

    keepers = {n: ray.get_actor(keeper_name(n), namespace=NAMESPACE) for n in seen["nodes"].values()}
    seen["drain"] = drain_a_node(run.base, run.client, keepers, run.second.node_id, run.mark)


def node_loss(run: Run, seen: dict[str, Any]) -> None:
    """Lose the second node (its raylet, worker and keeper) while it holds shards."""

    from harvest import service

    job = run.client.submit(NODE_LOSS_PROMPTS, model=MODEL_NAME, max_tokens=NODE_LOSS_TOKENS,
                            temperature=0, shard_size=2, defaults={"ignore_eos": True})  # fmt: skip
    second = run.second.node_id

    def second_node_holds() -> dict[str, Any] | None:
        for name, s in service.status()["workers"].items():
            if s["node_id"] == second and any(k.startswith(job.id) for k in s["shards"]):
                return {**s, "name": name}
        return None

    doomed = _wait("the second node's worker to lease a shard", second_node_holds, 60)
    run.cluster.remove_node(run.second, allow_graceful=False)
    run.mark("node_removed")
    run.client.wait(job.id, timeout=240, progress=False)
    run.mark("node_loss_done")

    # The controller learns that the lost worker died when Ray does: once the node has failed
    # its health checks (5 every 3 s by default), 15 s or more after the kill. The job needs
    # no controller (the lease lapses in 5 s) and may be done sooner: wait for the view.
    def lost_worker_dropped() -> dict[str, Any] | None:
        status = service.status()  # the controller lives on the head: it answers throughout
        return status if status["workers"] and doomed["name"] not in status["workers"] else None

    status = _wait("the controller to drop the lost node's worker", lost_worker_dropped, 90, 0.2)
    run.mark("node_loss_seen")
    seen["node_loss"] = {
        "doomed": doomed["name"],
        "doomed_shards": doomed["shards"],
        "job": run.client.get(job.id).to_dict(),
        "rows": run.client.results(job.id).to_pylist(),
        "workers": {n: s["node_id"] for n, s in status["workers"].items()},
        "deaths": status["deaths"],
    }


def down(run: Run, seen: dict[str, Any]) -> None:
    """`harvest down` stops the service and leaves the Ray cluster it did not start."""
    import ray

    from harvest import service

    stopped = run.harvest("down")
    run.mark("down")

    def controller_gone() -> bool:
        try:
            service.controller_handle()
        except ValueError:  # no actor of that name
            return True
        return False

    try:  # ray.kill returns before the actor's name is released
        gone = _wait("the controller to go", controller_gone, 30, 0.2)
    except TimeoutError:
        gone = False
    seen["down"] = {
        "rc": stopped.returncode,
        "output": stopped.stdout + stopped.stderr,
        "controller_gone": gone,
        "alive_nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
        "task": ray.get(ray.remote(num_cpus=0)(lambda: "ran").remote(), timeout=60),
    }


SCENARIOS = (online, takeover, drain, node_loss, down)  # in this order, on one cluster


def run_cluster(model: str, work: Path) -> dict[str, Any]:
    """Start a two-node cluster and the service on it, run the scenarios, report what happened."""
    import ray
    from ray.cluster_utils import Cluster

    from harvest.client import HarvestClient
    from harvest.local_redis import free_port
    from harvest.names import NAMESPACE
    from harvest.serve_env import use_serve_env
    from tests.conftest import RedisServer

    seen: dict[str, Any] = {"timings": {}}
    t0 = time.monotonic()

    def mark(step: str) -> None:
        seen["timings"][step] = round(time.monotonic() - t0, 1)
        print(f"{step}: {seen['timings'][step]} s", file=sys.stderr, flush=True)

    use_serve_env(private_ports=True)  # the cluster's processes, started from here, inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, logging_level="error")
    seen["nodes"] = {"head": cluster.head_node.node_id, "second": second.node_id}
    mark("cluster")
    (work / "redis").mkdir(exist_ok=True)
    redis = RedisServer(work / "redis")
    redis.start()
    # a data dir of its own: `harvest down` must find no record of a Ray that `up` started
    env = {**os.environ, "HARVEST_REDIS_URL": redis.url, "HARVEST_HOME": str(work / "home")}
    port = free_port()
    run = Run(cluster, second, f"http://127.0.0.1:{port}", HarvestClient(redis.url), env, mark)
    try:
        start_service(run, model, work, port)
        for scenario in SCENARIOS:
            scenario(run, seen)
    finally:  # the cluster goes whole (Serve's graceful stop took 25 s here)
        ray.shutdown()
        cluster.shutdown()
        redis.stop()
    mark("stopped")
    return seen


# ---------------------------------------------------------------------- the tests: judge it


@pytest.fixture(scope="module")
def seen(tiny_model, tmp_path_factory) -> dict[str, Any]:
    """What the child saw, and under "expected" each prompt's tokens from one engine with no
    interruption (what every result must equal), computed while the child runs."""
    work = tmp_path_factory.mktemp("multinode")
    out = work / "seen.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = work / "child.log"  # a file, not a pipe: Ray's logs would fill a pipe nobody reads yet
    with log.open("w") as sink:
        command = [sys.executable, __file__, str(tiny_model), str(work), str(out)]
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            expected = {
                "takeover": greedy(tiny_model, TAKEOVER_PROMPTS, TAKEOVER_TOKENS),
                "drain": greedy(tiny_model, DRAIN_PROMPTS, DRAIN_TOKENS),
                "node_loss": greedy(tiny_model, NODE_LOSS_PROMPTS, NODE_LOSS_TOKENS),
            }
            child.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            child.kill()  # a no-op once it has exited
    assert child.returncode == 0 and out.exists(), log.read_text()[-6000:]
    return {**json.loads(out.read_text()), "expected": expected}


def greedy(model: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    import torch

    from harvest.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(str(model), profile_latency=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # next to the child's workers, a second thread only waits for a core
    try:
        outs = engine.generate([engine.tokenizer.encode(p) for p in prompts], params)
    finally:
        torch.set_num_threads(threads)  # the rest of the session runs as it would have
    return [list(o.token_ids) for o in outs]


def check_exactly_once(part: dict[str, Any], prompts: list[str], expected: list[list[int]]) -> None:
    """One result per custom_id, no error, and each one the uninterrupted greedy output."""
    job, rows = part["job"], part["rows"]
    assert job["status"] == "completed", job
    assert sorted(r["custom_id"] for r in rows) == sorted(f"request-{i}" for i in range(len(prompts)))
    by_prompt = {r["prompt"]: r for r in rows}
    for prompt, tokens in zip(prompts, expected, strict=True):
        row = by_prompt[prompt]
        assert row["error_code"] is None, (row["error_code"], row["error_message"])
        assert row["output_token_ids"] == tokens, f"{row['custom_id']} differs from an uninterrupted run"


def test_the_service_serves_online_with_one_worker_on_each_node(seen):
    assert seen["online"]["usage"]["completion_tokens"] == 6, seen["online"]
    # the controller's view: two workers, on the two distinct nodes of the cluster
    assert sorted(seen["workers_at_start"].values()) == sorted(seen["nodes"].values())
    # the controller on the node `harvest up` ran on (the head), not wherever Ray likes
    assert seen["controller_node"] == seen["nodes"]["head"]


def test_a_shard_taken_over_on_the_other_node_restores_the_dead_workers_checkpoint(seen):
    part = seen["takeover"]
    assert part["victim_keeper"]["bytes_put"] > 0  # the victim's node keeper held its checkpoint
    check_exactly_once(part, TAKEOVER_PROMPTS, seen["expected"]["takeover"])
    assert any(d["worker"] == part["victim"] for d in part["deaths"])  # the controller saw it die
    takers = {r["worker"] for r in part["rows"]}
    other_node = [n for n, w in part["workers"].items() if w["node_id"] != part["victim_node"]]
    assert takers == set(other_node), (takers, part["workers"])  # finished on the other node ...
    assert all(r["resumed_tokens"] > 0 for r in part["rows"])  # ... from the recorded progress
    restored = part["workers"][other_node[0]]["totals"]["restored_tokens"]
    assert restored > 0  # ... with the KV fetched from the dead worker's node keeper, not recomputed


def test_a_drained_node_hands_its_requests_to_the_other_worker_with_their_checkpoints(seen):
    part, nodes = seen["drain"], seen["nodes"]
    assert part["cli_unknown"]["code"] == 4, part["cli_unknown"]  # `harvest drain` names what it did not find
    assert "no worker or node 'no-such-worker'" in part["cli_unknown"]["output"], part["cli_unknown"]
    assert part["answer"]["workers"] == [part["victim"]]  # the node's one worker
    assert part["answer"]["order"]["keeper_node"] == nodes["head"]  # checkpoints go to a node that stays
    given = part["last_state"]["offline"]
    assert given["shards"] == 1 and given["requests"] == 2 and given["checkpointed_tokens"] > 0, given
    check_exactly_once(part, DRAIN_PROMPTS, seen["expected"]["drain"])
    (shard,) = [int(k.split("/")[1]) for k in part["victim_shards"]]
    ids = (f"request-{2 * shard}", f"request-{2 * shard + 1}")  # shards hold consecutive requests
    handed = [r for r in part["rows"] if r["custom_id"] in ids]
    assert len(handed) == 2
    assert all(r["worker"] != part["victim"] and r["resumed_tokens"] > 0 for r in handed), handed
    # their KV came back from the head's keeper: the drained node's own keeper was killed first
    restored = sum(w["totals"]["restored_tokens"] for w in part["workers"].values())
    restored -= sum(part["restored_before"].get(n, 0) for n in part["workers"])
    assert restored > 0
    assert part["job"]["request_counts"]["failed"] == 0
    # online: the requests in flight finished and one sent during the drain was served (by
    # either worker: the drained one serves until HAProxy's checks take it out), then it left
    assert all(o["status"] == 200 and o["tokens"] == 200 for o in part["online_in_flight"]), part
    assert part["online_during"]["usage"]["completion_tokens"] == 6, part["online_during"]
    assert part["last_state"]["state"] in ("serving out", "drained") and part["victim"] not in part["workers"]
    context = sum(r["prompt_tokens"] + r["resumed_tokens"] for r in handed)  # what the resumer needed
    print(f"drain: shards released {part['released_s']:.2f} s after the call (hand-back itself "
          f"{given['seconds']:.2f} s), the worker left after {part['left_s']:.1f} s; "
          f"{given['generated_tokens']} generated tokens handed back, {given['checkpointed_tokens']} in "
          f"checkpoints; on resume {restored} of {context} context tokens restored, "
          f"{context - restored} recomputed")  # fmt: skip


def test_losing_a_whole_node_mid_job_loses_no_offline_request(seen):
    part = seen["node_loss"]
    assert any(k.startswith(part["job"]["id"]) for k in part["doomed_shards"])  # it held work
    check_exactly_once(part, NODE_LOSS_PROMPTS, seen["expected"]["node_loss"])
    assert any(d["worker"] == part["doomed"] for d in part["deaths"])  # the controller saw it die
    assert seen["nodes"]["second"] not in part["workers"].values()  # the node and its worker are gone
    assert part["workers"]  # the head's worker finished the job and still reports


def test_harvest_down_stops_the_service_and_leaves_the_cluster_running(seen):
    part = seen["down"]
    assert part["rc"] == 0 and "Ray left running" in part["output"], part["output"]
    assert part["controller_gone"]
    assert part["alive_nodes"] == [seen["nodes"]["head"]] and part["task"] == "ran"  # Ray still runs


if __name__ == "__main__":
    model_dir, work_dir, out_file = sys.argv[1:4]
    Path(out_file).write_text(json.dumps(run_cluster(model_dir, Path(work_dir)), default=str))
