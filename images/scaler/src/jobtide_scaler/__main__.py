"""Entry point: `python -m jobtide_scaler run --config FILE [--once] [--dry-run]`,
`python -m jobtide_scaler status -n NS RELEASE ...`, `python -m jobtide_scaler simulate ...` or
`python -m jobtide_scaler annotate -n NS KEY=VALUE POD...` (the chart's pre-delete hook)."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from collections.abc import Sequence

from jobtide_scaler.cli import parse_args
from jobtide_scaler.config import ConfigError, ScalerConfig, load_config

log = logging.getLogger("jobtide_scaler")

EXIT_CONFIG = 2
EXIT_NO_CLUSTER = 1
CACHE_SYNC_TIMEOUT = 60.0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["simulate"]:
        # Imported here: the simulator's dependencies are not needed to scale.
        from jobtide_scaler.simulate.cli import main as simulate_main

        return int(simulate_main(args[1:]) or 0)
    if args[:1] == ["status"]:
        # Imported here: it needs the user's kubeconfig, not the scaler's configuration.
        from jobtide_scaler.statuscmd import main as status_main

        return status_main(args[1:])
    if args[:1] == ["annotate"]:
        from jobtide_scaler.annotate import main as annotate_main

        return annotate_main(args[1:])
    if args and args[0].startswith("-") and args[0] not in ("-h", "--help"):
        args = ["run", *args]  # `run` is the default command
    options = parse_args(args)
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(options.config, dry_run=options.dry_run, once=options.once)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    log.info("configuration: %s", json.dumps(config.redacted(), sort_keys=True))
    return run(config, options)


def run(config: ScalerConfig, options: argparse.Namespace) -> int:
    # Imported here so that configuration errors are reported without the Kubernetes client
    # loading (it takes a while).
    from jobtide_scaler.broker import Broker
    from jobtide_scaler.cluster import Cluster, load_api_client
    from jobtide_scaler.jobs import cache_selector
    from jobtide_scaler.leader import LeaderElector
    from jobtide_scaler.loop import AlwaysLeader, Leadership, Scaler
    from jobtide_scaler.metrics import Health, Metrics, MetricsServer
    from jobtide_scaler.shutdown import GracefulShutdown

    shutdown = GracefulShutdown().install()
    metrics = Metrics()
    api_client = load_api_client()
    cluster = Cluster(
        api_client,
        config.namespace,
        cache_selector(config.release),
        on_request=metrics.request,
        on_error=metrics.error,
    )
    broker = Broker(config.broker, on_error=metrics.error)
    scaler: Scaler | None = None
    health = Health(
        stall_seconds=max(60.0, 6 * config.settings.poll_interval_seconds),
        ready=lambda: (
            cluster.synced
            and scaler is not None
            and scaler.owner_known
            and broker.tls_problem is None
        ),
    )
    server = MetricsServer(config.metrics_port, metrics, health)
    elector: LeaderElector | None = None
    leadership: Leadership = AlwaysLeader()
    if config.leader_election.enabled and not config.dry_run:
        elector = LeaderElector(
            api_client,
            config.namespace,
            config.leader_election,
            on_request=metrics.request,
            on_error=metrics.error,
            on_change=lambda leading: metrics.is_leader.set(1 if leading else 0),
        )
        leadership = elector
    else:
        metrics.is_leader.set(1)
    identity = elector.identity if elector is not None else socket.gethostname()
    scaler = Scaler(config, broker, cluster, metrics, leadership=leadership, identity=identity)

    server.start()
    log.info("metrics, /healthz and /readyz on port %d", server.port)
    cluster.start()
    try:
        if not cluster.wait_synced(CACHE_SYNC_TIMEOUT):
            if shutdown.requested:
                return 0
            log.error("the Job cache did not sync within %.0f s", CACHE_SYNC_TIMEOUT)
            if config.once:
                return EXIT_NO_CLUSTER
        if elector is not None:
            if config.once:
                elector.try_acquire_or_renew()
            else:
                elector.start()
        while not shutdown.requested:
            try:
                scaler.run_cycle()
            except Exception:
                # A bug or an unforeseen answer must not stop the scaling of the others.
                metrics.error("cycle")
                log.exception("scaling cycle failed")
            health.cycle_done()
            if config.once:
                break
            shutdown.wait(config.settings.poll_interval_seconds)
    finally:
        if elector is not None:
            elector.stop()
        cluster.stop()
        broker.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
