"""What one job costs each process of the fabric, in CPU time (steadier than wall time on a busy VM).

    python benchmarks/cost.py [--jobs 512] [--clients 16] [--sweep]

The real stack on this machine (`nnfabric-server serve`'s: the api in this process, the
scheduler in its own, a Ray Serve replica, Redis), a tiny GPT-2. A client process runs --jobs
one-prompt patching jobs from --clients threads (each its own thin model), or with --sweep as
one sweep over one connection. Each process's CPU time is read before and after (psutil: user +
system; the api's own thread from /proc), and printed per job beside the goals; the replica's
is split into its model's runs (forward passes with their hooks) and everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: tests.support

import nnfabric  # noqa: E402

from services.launcher import EmbeddedFabric  # noqa: E402
from tests.support.keys import new_key  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"
GOALS = {"api": 1.5, "scheduler": 0.5, "replica besides the model": 1.5, "redis": 0.5, "server total": 4.0,
         "client": 3.0}  # fmt: skip


def patch(model: nnfabric.LanguageModel) -> Any:
    with model.trace(PROMPT, remote=True):
        h = model.transformer.h[0].output
        model.transformer.h[0].output[:, -1] = h[:, -1] * 0.5
        logits = model.output.logits[0, -1].save()
    return logits.value


def client_main(url: str, key: str, jobs: int, clients: int, sweep: bool) -> None:
    """The researchers' side, in a process of its own: one JSON line (wall time, its CPU time)."""
    fabric = nnfabric.connect(url, key, progress=False)
    models = [fabric.model("tiny") for _ in range(clients)]
    for model in models[:2]:
        patch(model)  # warm
    before = psutil.Process().cpu_times()
    start = time.perf_counter()
    if sweep:
        model = models[0]
        with model.sweep(remote=True) as jobs_sweep:
            for _ in range(jobs):
                with model.trace(PROMPT):
                    h = model.transformer.h[0].output
                    model.transformer.h[0].output[:, -1] = h[:, -1] * 0.5
                    model.output.logits[0, -1].save()
        assert not jobs_sweep.failed, jobs_sweep.failed[:3]
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(patch, [models[i % clients] for i in range(jobs)]))
    wall = time.perf_counter() - start
    after = psutil.Process().cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    print(json.dumps({"wall": wall, "cpu": cpu}))


def thread_cpu(tid: int) -> float:
    """A thread's CPU seconds (user + system), from /proc (0 once it has ended)."""
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def cpu_of(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def replica_stats() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("model-tiny", app_name="model-tiny")

    async def ask() -> dict[str, Any]:
        stats: dict[str, Any] = await handle.stats.remote()  # type: ignore[attr-defined]
        return stats

    return asyncio.run(ask())


def snapshot(fabric: EmbeddedFabric) -> dict[str, float]:
    me = psutil.Process()
    # The api: its event loop's thread and the worker threads it hands parsing and validation to.
    api_tids = [fabric.api_thread_id(), *(t.native_id for t in threading.enumerate()
                                          if t.name.startswith("AnyIO worker") and t.native_id)]  # fmt: skip
    replica = replica_stats()
    known = {fabric.scheduler.pid if fabric.scheduler else -1, fabric.redis.process.pid if fabric.redis else -1,
             replica["pid"], me.pid}  # fmt: skip
    ray_system = sum(cpu_of(p.pid) for p in me.children(recursive=True)
                     if p.pid not in known and "py-spy" not in " ".join(_cmdline(p)))  # fmt: skip
    process = sum(me.cpu_times()[:2])
    api = sum(thread_cpu(tid) for tid in api_tids)
    return {
        "api": api,
        "rest of the serve process": process - api,
        "scheduler": cpu_of(fabric.scheduler.pid) if fabric.scheduler else 0.0,
        "replica model": replica["model_cpu_s"],
        "replica besides the model": replica["cpu_s"] - replica["model_cpu_s"],
        "redis": cpu_of(fabric.redis.process.pid) if fabric.redis else 0.0,
        "ray and serve system": ray_system,
        "jobs": replica["jobs"],
        "batches": replica["batches"],
    }


def start_profiles(fabric: EmbeddedFabric, folder: Path) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
    """py-spy on the serve process (the api's thread among others), the scheduler and the replica."""
    spy = str(Path(sys.executable).parent / "py-spy")
    pids = {"serve process": os.getpid(), "scheduler": fabric.scheduler.pid if fabric.scheduler else 0,
            "replica": replica_stats()["pid"]}  # fmt: skip
    found = {}
    for name, pid in pids.items():
        out = folder / f"{name.replace(' ', '_')}.txt"
        command = [spy, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking",
                   "--threads"]  # fmt: skip
        found[name] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    time.sleep(1.0)  # py-spy attaches before the load starts (a profile, not a measurement)
    return found


def print_profiles(spies: dict[str, tuple[subprocess.Popen[bytes], Path]], api_thread: str) -> None:
    """Each process's functions by own samples (self time), then our own functions by inclusive
    samples (time in them and what they call), from py-spy's collapsed stacks."""
    import signal

    for name, (process, out) in spies.items():
        process.send_signal(signal.SIGINT)
        process.wait(30)
        if os.environ.get("COST_KEEP_PROFILES"):
            import shutil

            shutil.copy(out, Path(os.environ["COST_KEEP_PROFILES"]) / out.name)
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        for line in out.read_text().splitlines() if out.exists() else []:
            stack, _, count = line.rpartition(" ")
            thread, *frames = stack.split(";")
            if name == "serve process" and api_thread not in thread and "AnyIO worker" not in thread:
                continue  # the api's threads only (Ray's and the benchmark's threads share the process)
            total += int(count)
            leaf = frames[-1] if frames else "?"
            own[leaf] = own.get(leaf, 0) + int(count)
            for frame in set(frames):
                if "services/" in frame or "nnfabric/" in frame:
                    inclusive[frame] = inclusive.get(frame, 0) + int(count)
        print(f"\n{name}: {total} samples; top functions by own time")
        for leaf, count in sorted(own.items(), key=lambda item: -item[1])[:12]:
            print(f"  {100 * count / max(total, 1):5.1f}%  {leaf[:150]}")
        print(f"{name}: our functions by inclusive time")
        for frame, count in sorted(inclusive.items(), key=lambda item: -item[1])[:25]:
            print(f"  {100 * count / max(total, 1):5.1f}%  {frame[:150]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="the jobs as one sweep over one connection")
    parser.add_argument("--profile", action="store_true", help="py-spy each server process meanwhile; print its top lines")
    parser.add_argument("--client", nargs=2, metavar=("URL", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(*args.client, args.jobs, args.clients, args.sweep)
        return
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp, "tiny")
        build_gpt2(tiny)
        catalog = Path(tmp, "catalog.yaml")
        catalog.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": str(tiny),
                                                        "limits": {"max_batch": 16}}]}))  # fmt: skip
        fabric = EmbeddedFabric.start(catalog, redis_data_dir=str(Path(tmp, "redis")))
        try:
            fabric.wait_ready()
            key = new_key(fabric.settings.redis_url, "bench", max_active=1_000_000)
            command = [sys.executable, __file__, "--jobs", str(args.jobs), "--clients", str(args.clients),
                       *(["--sweep"] if args.sweep else []), "--client", fabric.url, key]  # fmt: skip
            before = snapshot(fabric)
            spies = start_profiles(fabric, Path(tmp)) if args.profile else {}
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            after = snapshot(fabric)
            print_profiles(spies, f"({fabric.api_thread_id()})")
        finally:
            fabric.stop()
    client = json.loads(out.strip().splitlines()[-1])
    batches = after.pop("batches") - before.pop("batches")
    ran = after.pop("jobs") - before.pop("jobs")
    per_job = {name: (after[name] - before[name]) / args.jobs * 1e3 for name in before}
    server = sum(per_job.values()) - per_job["replica model"]
    how = "one sweep, one connection" if args.sweep else f"{args.clients} client threads"
    print(f"\n{args.jobs} one-prompt patching jobs ({how}): {args.jobs / client['wall']:.0f} jobs/s")
    print(f"the replica ran {ran} jobs in {batches} batches ({ran / max(batches, 1):.1f} jobs a batch)")
    print(f"{'process':<30} {'CPU ms/job':>10}  goal")
    for name, value in per_job.items():
        goal = GOALS.get(name)
        print(f"{name:<30} {value:>10.2f}  {'' if goal is None else f'<= {goal}'}")
    print(f"{'server total (but the model)':<30} {server:>10.2f}  <= {GOALS['server total']}")
    print(f"{'the Python client':<30} {client['cpu'] / args.jobs * 1e3:>10.2f}  <= {GOALS['client']}")
    print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
