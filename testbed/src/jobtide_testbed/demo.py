"""`ci/demo`: jobtide end to end on a local single-node cluster.

Brings up the test bed's control plane and real node (`ci/testbed up --node`, or uses one
already up), builds and loads the images, installs the chart with values.example.yaml made
to run on the node (chartnode.node_values) and the demo's own sizes and timeouts
(demo-values.yaml beside this file), publishes a burst of tasks to both pipelines and shows
the queues and workers live. At the end it prints a summary, writes a PNG timeline and tears
everything down, or with --keep leaves the cluster running.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jobtide_worker.publisher import publish

from jobtide_testbed import hostpods
from jobtide_testbed.chartnode import (
    Helm,
    ReleaseBroker,
    Sample,
    Watcher,
    ctr_loader,
    diagnostics,
    load_chart_images,
    node_values,
    write_values,
)
from jobtide_testbed.karpenter import WORKER_RESOURCES, NodePoolSpec, NodeWatch, pool_values
from jobtide_testbed.process import wait_for
from jobtide_testbed.state import STATE_FILE
from jobtide_testbed.tools import CACHE, CHART, REPO

EXAMPLE_VALUES = REPO / "values.example.yaml"
# The demo's own settings: small sizes for a 2-core node and short timeouts, so the demo ends
# within minutes. Given to helm after the node's values; helm merges the two.
DEMO_VALUES = Path(__file__).with_name("demo-values.yaml")
NAMESPACE, RELEASE = "jobs", "demo"


@dataclass(frozen=True)
class DemoConfig:
    keep: bool
    short_tasks: int
    long_tasks: int
    out_dir: Path
    seed: int
    # Workers on a node pool Karpenter scales from zero (`ci/testbed up --autoscaled-pool`).
    autoscaled_pool: bool = False

    def __post_init__(self) -> None:
        if self.short_tasks < 0 or self.long_tasks < 0:
            raise ValueError("--short-tasks and --long-tasks must be 0 or more")
        if self.short_tasks + self.long_tasks == 0:
            raise ValueError("--short-tasks and --long-tasks: nothing to publish")


def autoscaled_values(pipelines: Iterable[str]) -> dict[str, Any]:
    """Values over the demo's that put the workers on the autoscaled pool (karpenter.py): its
    label and taint, and requests that fit four workers on a node; helm merges them last."""
    spec = NodePoolSpec()
    selector = {spec.label[0]: spec.label[1]}
    on_pool = {"resources": WORKER_RESOURCES, "podTemplate": {"spec": {"nodeSelector": selector}}}
    return {
        "nodePool": pool_values(spec),
        "pipelineDefaults": {"resources": WORKER_RESOURCES},
        "pipelines": {name: on_pool for name in pipelines},
    }


def testbed(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "jobtide_testbed", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ci/testbed {' '.join(args)}:\n{result.stdout}{result.stderr}")
    return result.stdout


def step(message: str, began: float) -> None:
    print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)


class LiveLine:
    """One status line, rewritten in place on a terminal (every 5 s as plain lines else)."""

    def __init__(self, queues: dict[str, str], total: int) -> None:
        self.queues = queues
        self.total = total
        self.tty = sys.stdout.isatty()
        self._last_plain = -10.0

    def __call__(self, sample: Sample) -> None:
        depth = "  ".join(
            f"{q} {sample.ready[q] + sample.unacked[q]:4d}" for q in self.queues.values()
        )
        line = (
            f"{sample.elapsed:5.0f}s | queued: {depth} | workers: "
            f"{sample.pending_pods} pending, {sample.running_pods} running | "
            f"done {sum(sample.acked.values()):4d}/{self.total}"
        )
        if self.tty:
            print(f"\r\033[K{line}", end="", flush=True)
        elif sample.elapsed - self._last_plain >= 5:
            self._last_plain = sample.elapsed
            print(line, flush=True)

    def close(self) -> None:
        if self.tty:
            print(flush=True)


def summary(watcher: Watcher, published: dict[str, int]) -> str:
    rows = [("pipeline", "tasks", "done", "Jobs", "peak", "1st running", "drained", "pod-seconds")]
    for pipeline, queue in watcher.queues.items():
        workers = [w for w in watcher.workers.values() if w.pipeline == pipeline]
        first = min((w.running for w in workers if w.running is not None), default=None)
        drained = next(
            (
                s.elapsed
                for s in watcher.samples
                if s.acked.get(queue, 0) >= published[pipeline]
                and s.ready[queue] + s.unacked[queue] == 0
            ),
            None,
        )
        pod_seconds = sum(
            (w.finished or watcher.samples[-1].elapsed) - w.running
            for w in workers
            if w.running is not None
        )
        rows.append(
            (
                pipeline,
                str(published[pipeline]),
                str(watcher.samples[-1].acked.get(queue, 0)),
                str(len({w.job for w in workers})),
                str(watcher.peak_active_jobs(pipeline)),
                "-" if first is None else f"{first:.0f} s",
                "-" if drained is None else f"{drained:.0f} s",
                f"{pod_seconds:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(watcher: Watcher, path: Path, caps: dict[str, int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.elapsed for s in watcher.samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    for queue in watcher.queues.values():
        top.plot(t, [s.ready[queue] + s.unacked[queue] for s in watcher.samples], label=queue)
    top.set_ylabel("tasks queued (ready + in flight)")
    top.set_title("jobtide demo: a burst on one local node")
    top.legend()
    top.grid(alpha=0.3)
    for pipeline in watcher.queues:
        bottom.step(
            t,
            [s.active_jobs.get(pipeline, 0) for s in watcher.samples],
            where="post",
            label=f"{pipeline} Jobs (max {caps[pipeline]})",
        )
    bottom.step(
        t, [s.running_pods for s in watcher.samples], where="post", label="pods running", ls="--"
    )
    bottom.step(
        t, [s.pending_pods for s in watcher.samples], where="post", label="pods pending", ls=":"
    )
    bottom.set_ylabel("workers")
    bottom.set_xlabel("seconds since the burst was published")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(config: DemoConfig) -> int:
    began = time.monotonic()
    started_testbed = False
    up_args = ["up", "--node", *(["--autoscaled-pool"] if config.autoscaled_pool else [])]
    if STATE_FILE.exists():
        state = json.loads(STATE_FILE.read_text())
        if "node_socket" not in state or config.autoscaled_pool != ("node_pool" in state):
            print(f"another kind of test bed is up: run `ci/testbed down` first (or `ci/testbed "
                  f"{' '.join(up_args)}` yourself)")  # fmt: skip
            return 1
        step("using the test bed that is already up", began)
    else:
        step(f"starting the control plane and the node (ci/testbed {' '.join(up_args)})", began)
        testbed(*up_args)
        started_testbed = True
        state = json.loads(STATE_FILE.read_text())
    kubeconfig = Path(state["kubeconfig"])
    helm = Helm(kubeconfig, NAMESPACE)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        step("building images and loading them into the node's containerd", began)
        load_chart_images(ctr_loader(Path(state["node_socket"])), config.out_dir / "images")
        example = yaml.safe_load(EXAMPLE_VALUES.read_text())
        values_file = write_values(config.out_dir / "values.yaml", node_values(example))
        value_files = [values_file, DEMO_VALUES]
        if config.autoscaled_pool:
            pool = autoscaled_values(example["pipelines"])
            value_files.append(write_values(config.out_dir / "autoscaled-values.yaml", pool))
        helm("uninstall", RELEASE, "--wait", check=False)
        step(f"helm install {RELEASE} {CHART.relative_to(REPO)} -n {NAMESPACE} "
             f"{' '.join(f'-f {path}' for path in value_files)}", began)  # fmt: skip
        helm.install(RELEASE, value_files, extra=["--create-namespace"])
        values = helm.values(RELEASE)
        broker = ReleaseBroker.find(kubeconfig, NAMESPACE, RELEASE)
        pipelines = values["pipelines"]
        queues = {name: p["queue"] for name, p in pipelines.items()}
        caps = {name: int(p["maxWorkers"]) for name, p in pipelines.items()}
        rng = random.Random(config.seed)
        bursts = {
            "resize-images": [
                {"seconds": round(rng.uniform(0.2, 1.5), 2)} for _ in range(config.short_tasks)
            ],
            "train-models": [
                {"seconds": round(rng.uniform(15, 25), 1)} for _ in range(config.long_tasks)
            ],
        }
        published = {name: len(tasks) for name, tasks in bursts.items()}
        total = sum(published.values())
        live = LiveLine(queues, total)
        nodes = NodeWatch(kubeconfig, NodePoolSpec().name)
        host_pods = Path(str(state.get("host_pods_root", "")))
        read_log = (
            functools.partial(hostpods.read_log, host_pods) if config.autoscaled_pool else None
        )
        with Watcher(kubeconfig, NAMESPACE, broker, queues, read_log=read_log) as watcher:
            if config.autoscaled_pool:
                watcher.on_sample(nodes.sample)
            step(
                f"publishing {config.short_tasks} short tasks (0.2-1.5 s) to resize-images and "
                f"{config.long_tasks} long ones (15-25 s) to train-models",
                began,
            )
            for name, tasks in bursts.items():
                publish(queues[name], tasks, broker=broker.config(), declare=False)
            watcher.on_sample(live)

            def finished() -> bool:
                s = watcher.latest
                return (
                    s is not None
                    and sum(s.acked.values()) >= total
                    and s.depth == 0
                    and s.running_pods + s.pending_pods == 0
                    and not any(s.active_jobs.values())
                )

            try:
                wait_for(
                    finished, timeout=900, what="all tasks done and every worker gone", interval=1
                )
            finally:
                live.close()
        step("every task done; every worker left by itself after its idle timeout", began)
        if config.autoscaled_pool:
            step("waiting for Karpenter to remove the empty nodes", began)

            def no_nodes() -> bool:
                nodes.sample()
                return nodes.zero_since() is not None

            wait_for(
                no_nodes, timeout=300, what="Karpenter's nodes consolidated to zero", interval=1
            )
            print(
                f"Karpenter launched {len(nodes.records)} nodes (peak {nodes.peak}, "
                f"{nodes.node_seconds():.0f} node-seconds); first Ready after "
                f"{nodes.first_ready() or 0:.0f} s, none left after {nodes.zero_since():.0f} s"
            )
        print()
        print(summary(watcher, published))
        png = plot(watcher, config.out_dir / "timeline.png", caps)
        print(f"\ntimeline: {png}")
        print(f"demo took {time.monotonic() - began:.0f} s in all")
    except BaseException:
        print("\n".join(diagnostics(kubeconfig, NAMESPACE)), file=sys.stderr)
        raise
    finally:
        if config.keep:
            print(
                "\nThe cluster keeps running:\n"
                f"  export KUBECONFIG={kubeconfig}\n"
                f"  kubectl -n {NAMESPACE} get jobs,pods -w\n"
                f"  helm -n {NAMESPACE} status {RELEASE}   (helm and kubectl: source ci/env.sh)\n"
                f"  helm -n {NAMESPACE} test {RELEASE}\n"
                "  ci/testbed down   # stops it all"
            )
        else:
            helm("uninstall", RELEASE, "--wait", check=False)
            if started_testbed:
                step("stopping the cluster (ci/testbed down)", began)
                testbed("down")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ci/demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_from(parser, parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (for `ci/demo` and `python -m jobtide_testbed demo`)."""
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    parser.add_argument("--short-tasks", type=int, default=400, help="tasks for resize-images")
    parser.add_argument("--long-tasks", type=int, default=6, help="tasks for train-models")
    parser.add_argument("--seed", type=int, default=1, help="seed of the task durations")
    parser.add_argument(
        "--out", type=Path, default=CACHE / "demo", help="folder of the PNG and the values file"
    )
    parser.add_argument(
        "--autoscaled-pool",
        action="store_true",
        help="run the workers on a node pool that Karpenter scales from zero and back "
        "(`ci/testbed up --node --autoscaled-pool`; nodes are kwok's, workers host processes)",
    )


def run_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = DemoConfig(
            args.keep, args.short_tasks, args.long_tasks, args.out, args.seed, args.autoscaled_pool
        )
    except ValueError as error:
        parser.error(str(error))
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
