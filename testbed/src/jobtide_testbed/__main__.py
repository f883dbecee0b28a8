"""`python -m jobtide_testbed up|down|status|images|demo` (`ci/testbed`, `ci/images`,
`ci/demo`): the test bed by hand, for debugging, for building the images and for the demo.

`up` starts RabbitMQ and the control plane in the background and prints how to reach them:
with a kwok fake node, or with `--node` a real node that runs containers (node.py).
`down` stops everything it started; `status` says what runs.
State lives in $JOBTIDE_TESTBED_DIR (default ~/.cache/jobtide/testbed).
`images` builds jobtide's images on the test bed's private Docker engine (no registry).
`demo` runs jobtide end to end on a local node (demo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from jobtide_testbed import demo
from jobtide_testbed.images import DockerDaemon, ImageBuilder, worker_images
from jobtide_testbed.karpenter import AutoscaledPool, NodePoolSpec, pool_values
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.node import clean_host, kill_all_tasks, start_cluster_with_node
from jobtide_testbed.process import Process, stop_group
from jobtide_testbed.rabbitmq import RabbitMQ
from jobtide_testbed.state import STATE_DIR, STATE_FILE


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def up(args: argparse.Namespace) -> int:
    if STATE_FILE.exists():
        print(f"test bed already up (state in {STATE_FILE}); run `ci/testbed down` first")
        return 1
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir(parents=True)
    broker = RabbitMQ(STATE_DIR / "rabbitmq", name="testbed")
    started: list[Process] = []
    node_state: dict[str, object] = {}
    try:
        broker.start()
        started += broker.processes
        if args.node:
            node = start_cluster_with_node(STATE_DIR / "node")
            cluster = node.cluster
            started += cluster.processes + node.processes
            # The node lock must outlive this command: a background holder keeps it.
            node_state = {
                "node_root": str(node.host.root),
                "node_socket": str(node.socket),
                "node_lock_pgid": node.host.keep_lock_in_background(),
            }
            if args.autoscaled_pool:
                pool = start_autoscaled_pool(cluster, started)
                node_state["node_pool"] = describe_pool(pool)
                node_state["host_pods_root"] = str(pool.host_pods_root)
        else:
            cluster = KubeCluster(STATE_DIR / "kube")
            cluster.start()
            started += cluster.processes
            cluster.add_fake_node("kwok-node-0")
    except BaseException:
        for p in reversed(started):
            p.stop()
        raise
    state = {
        **node_state,
        "pgids": [p.pid for p in started],
        "kubeconfig": str(cluster.kubeconfig),
        "server": cluster.server,
        "amqp_url": broker.amqp_url,
        "management_url": broker.management_url,
        "logs": [str(p.log_path) for p in started],
    }
    STATE_FILE.write_text(json.dumps(state, indent=2))
    STATE_FILE.chmod(0o600)
    _print(state)
    return 0


def down(args: argparse.Namespace) -> int:
    if not STATE_FILE.exists():
        print("test bed is not up")
        return 0
    state = json.loads(STATE_FILE.read_text())
    if "node_socket" in state:
        kill_all_tasks(Path(state["node_socket"]))
    for pgid in reversed(state["pgids"]):
        stop_group(pgid, timeout=20, sig=signal.SIGTERM)
    if "node_root" in state:
        clean_host(Path(state["node_root"]))
        stop_group(state["node_lock_pgid"], timeout=5, sig=signal.SIGTERM)
    STATE_FILE.unlink()
    print("test bed stopped")
    return 0


def status(args: argparse.Namespace) -> int:
    if not STATE_FILE.exists():
        print("test bed is not up")
        return 1
    state = json.loads(STATE_FILE.read_text())
    _print(state)
    dead = [
        log for pgid, log in zip(state["pgids"], state["logs"], strict=True) if not _alive(pgid)
    ]
    for log in dead:
        print(f"NOT RUNNING: {Path(log).stem} (log: {log})")
    return 1 if dead else 0


def images(args: argparse.Namespace) -> int:
    with DockerDaemon() as daemon:
        builder = ImageBuilder(daemon)
        for tag in worker_images(builder):
            print(f"built {tag}")
            if args.save is not None:
                tar = args.save / (tag.replace("/", "_").replace(":", "_") + ".tar")
                print(f"saved {builder.save(tag, tar)}")
    return 0


def start_autoscaled_pool(cluster: KubeCluster, started: list[Process]) -> AutoscaledPool:
    """Karpenter, its kwok and the host-pod runner (karpenter.py), with one NodePool
    shaped like values.example.yaml's."""
    pool = AutoscaledPool(cluster, STATE_DIR / "karpenter", detached=True)
    pool.start()  # may replace its Karpenter process: record the processes after
    started += pool.processes
    pool.apply_node_pool(NodePoolSpec())
    return pool


def describe_pool(pool: AutoscaledPool) -> str:
    spec = NodePoolSpec()
    return (
        f"NodePool {spec.name} ({spec.label[0]}={spec.label[1]}, tainted; "
        f"{', '.join(spec.instance_types)}; {spec.consolidation_policy} after "
        f"{spec.consolidate_after}); chart values: nodePool: {json.dumps(pool_values(spec))}; "
        f"workers' logs: {pool.host_pods_root}/NAMESPACE/POD.log"
    )


def _print(state: dict[str, object]) -> None:
    print(f"export KUBECONFIG={state['kubeconfig']}")
    print(f"# apiserver:  {state['server']}")
    print(f"# AMQP:       {state['amqp_url']}")
    print(f"# management: {state['management_url']}")
    print(f"# logs:       {STATE_DIR}/*/logs/")
    if "node_socket" in state:
        socket = state["node_socket"]
        print(f"# images:     ctr --address {socket} -n k8s.io images import IMAGE.tar")
    if "node_pool" in state:
        print(f"# autoscaled: {state['node_pool']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobtide_testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start RabbitMQ and the control plane")
    up_parser.add_argument(
        "--node",
        action="store_true",
        help="a real node that runs containers (node.py) instead of a kwok node",
    )
    up_parser.add_argument(
        "--autoscaled-pool",
        action="store_true",
        help="with --node: Karpenter (kwok provider) scaling a worker node pool from zero, its "
        "nodes' worker pods run as host processes (karpenter.py)",
    )
    up_parser.set_defaults(func=up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=down)
    sub.add_parser("status", help="show addresses and what runs").set_defaults(func=status)
    images_parser = sub.add_parser(
        "images", help="build the base, worker and hello images on the private Docker engine"
    )
    images_parser.add_argument(
        "--save", type=Path, metavar="DIR", help="also write `docker save` tars into DIR"
    )
    images_parser.set_defaults(func=images)
    demo_parser = sub.add_parser(
        "demo",
        help="jobtide end to end on a local node",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=lambda args: demo.run_from(demo_parser, args))
    args = parser.parse_args(argv)
    if getattr(args, "autoscaled_pool", False) and not args.node:
        parser.error("--autoscaled-pool needs --node (the chart's scaler and broker run there)")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
