"""engram-serve on Ray Serve, against a local Ray cluster this module starts and stops: two
replicas (server.ray_serve, placement shared) answer plain and streamed requests through Serve's
HTTP proxy, both serve (the x-engram-worker header names the replica, and Ray's metrics export
counts each replica's successes under its `replica` label), they map one copy of the tables
(the copy's Pss summed over the replica processes is one table), and a replica killed with
SIGKILL is replaced by Ray while later requests succeed. The deploy files are checked without a
cluster in test_ray_deploy_files.py. test_ray_serve.py runs this module in a pytest process of
its own."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from loadtest.process import free_port
from offload.shared import SharedCopy
from loadtest.memory import mapping_kb

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from server.ray_serve import EngramReplica  # noqa: E402

pytestmark = pytest.mark.slow

REPLICA_HEADER = "x-engram-worker"
BODY = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(engram_ckpt):
    """Ray (2 CPUs, its temp dir, ports of its own) with two replicas of one engine each."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    shared = Path(f"/dev/shm/engram-test-ray-{os.getpid()}")
    metrics_port, http_port = free_port(), free_port()
    # a small object store: Serve passes no large objects, and the default (30% of RAM in /dev/shm)
    # competes with the table copies and the rest of the suite for memory
    ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=True, dashboard_port=free_port(),
             _metrics_export_port=metrics_port, log_to_driver=False, object_store_memory=256 * 2**20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        options = ["--engram", engram_ckpt, "--shared-table-dir", str(shared), "--max-model-len", "256",
                   "--max-num-seqs", "4"]
        app = EngramReplica.options(num_replicas=2, ray_actor_options={"num_cpus": 1}).bind(options)
        serve.run(app, name="engram", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{http_port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
               "ckpt": Path(engram_ckpt), "shared": shared}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


def _complete(cluster) -> httpx.Response:
    """One request on a fresh connection."""
    r = httpx.post(f"{cluster['url']}/v1/completions", json=BODY, timeout=120)
    assert r.status_code == 200, r.text
    return r


def _replica_pids() -> dict[str, int]:
    """Replica tag -> pid of the live replica actors, from Ray's state API."""
    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
    return {a.name.rsplit("#", 1)[1]: a.pid for a in actors if a.name.startswith("SERVE_REPLICA::engram#")}


def _exported_successes(cluster) -> dict[str, float]:
    """engram_serve_request_success_total per replica, as Ray's metrics export has it."""
    text = httpx.get(cluster["metrics"], timeout=30).text
    out: Counter = Counter()
    for labels, value in re.findall(r"^ray_engram_serve_request_success_total\{([^}]*)\} (\S+)$", text, re.M):
        out[re.search(r'replica="([^"]*)"', labels).group(1)] += float(value)
    return dict(out)


def test_plain_and_streamed_requests_through_the_proxy_reach_both_replicas(cluster):
    served = Counter(_complete(cluster).headers[REPLICA_HEADER] for _ in range(12))
    assert set(served) == set(_replica_pids()), served
    body = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{cluster['url']}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_each_replicas_metrics_reach_rays_export_under_its_replica_label(cluster):
    served = Counter(_complete(cluster).headers[REPLICA_HEADER] for _ in range(8))
    before = _exported_successes(cluster)  # may lag: compare the totals once the export caught up
    deadline = time.monotonic() + 60
    while True:
        exported = _exported_successes(cluster)
        if set(exported) == set(_replica_pids()) and sum(exported.values()) >= 12 + 1 + sum(served.values()):
            break
        assert time.monotonic() < deadline, (before, exported, served)
        time.sleep(1)
    assert all(exported[tag] >= count for tag, count in served.items()), (exported, served)


def _copies(cluster) -> list[SharedCopy]:
    tables = json.loads((cluster["ckpt"] / "engram.json").read_text())["tables"]
    return [SharedCopy.of(entry, cluster["shared"]) for entry in tables.values()]


def _assert_one_copy(cluster) -> None:
    """Every replica maps the whole of each table copy, and their Pss adds up to one table."""
    pids = list(_replica_pids().values())
    assert len(pids) == 2
    for copy in _copies(cluster):
        usage = [mapping_kb(pid, copy.path) for pid in pids]
        assert all(u["Rss"] >= 0.99 * copy.nbytes / 1024 for u in usage), usage
        assert sum(u["Pss"] for u in usage) == pytest.approx(copy.nbytes / 1024, rel=0.02), usage


def test_the_replicas_map_one_copy_of_the_tables(cluster):
    _assert_one_copy(cluster)


def test_a_killed_replica_is_replaced_and_later_requests_succeed(cluster):
    before = _replica_pids()
    copies = {c.path: c.path.stat() for c in _copies(cluster)}
    victim_tag, victim = next(iter(before.items()))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:
        now = _replica_pids()
        status = serve.status().applications["engram"]
        if victim_tag not in now and len(now) == 2 and status.status == "RUNNING":
            break
        assert time.monotonic() < deadline, (before, now, status)
        time.sleep(1)
    served = Counter(_complete(cluster).headers[REPLICA_HEADER] for _ in range(12))
    assert set(served) == set(now), (served, now)
    for path, stat in copies.items():  # the new replica attached to the node's copy, rather than rewrote it
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    _assert_one_copy(cluster)
