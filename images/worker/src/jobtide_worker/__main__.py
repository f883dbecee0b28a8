"""`python -m jobtide_worker`: run the worker (configuration from the environment).
`python -m jobtide_worker publish --queue Q < tasks.jsonl`: publish one JSON task per line.
`python -m jobtide_worker run-local --handler mod:func < tasks.jsonl`: run a handler on them
as the worker would, without a broker (jobtide_worker.local)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from jobtide_worker.config import BrokerConfig, BrokerTlsError, ConfigError, WorkerConfig
from jobtide_worker.logs import ERROR, EventLog
from jobtide_worker.runner import EXIT_CONFIG, EXIT_HANDLER, HandlerLoadError, Runner, load_handler

# run-local: some task was dead-lettered.
EXIT_DEAD_LETTERED = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["publish"]:
        return publish_main(args[1:])
    if args[:1] == ["run-local"]:
        return run_local_main(args[1:])
    if args:
        print(
            f"usage: python -m jobtide_worker [publish --queue Q | run-local --handler M:F];"
            f" got {args}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        config = WorkerConfig.from_env()
    except ConfigError as e:
        print(f"jobtide-worker: bad configuration: {e}", file=sys.stderr)
        return EXIT_CONFIG
    log = EventLog(config.log_format)
    try:
        handler = load_handler(config.handler)
    except HandlerLoadError as e:
        log.event(ERROR, "handler could not be loaded", handler=config.handler, error=str(e))
        return EXIT_HANDLER
    return Runner(handler, config, log).run()


def publish_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobtide_worker publish",
        description="Publish one task per line of standard input (each line a JSON value) "
        "with publisher confirms. The broker comes from the JOBTIDE_BROKER_* variables.",
    )
    parser.add_argument("--queue", required=True)
    parser.add_argument(
        "--no-declare",
        action="store_true",
        help="do not declare the queue topology (the queue must exist)",
    )
    args = parser.parse_args(argv)
    try:
        broker = BrokerConfig.from_env()
        tasks = list(_read_tasks(sys.stdin))
    except (ConfigError, ValueError) as e:
        print(f"jobtide-worker publish: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from jobtide_worker.publisher import publish

    try:
        ids = publish(args.queue, tasks, broker=broker, declare=not args.no_declare)
    except BrokerTlsError as e:
        print(f"jobtide-worker publish: broker TLS failed: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"published {len(ids)} tasks to {args.queue}", file=sys.stderr)
    return 0


def run_local_main(argv: Sequence[str]) -> int:
    from jobtide_worker.local import DEFAULT_QUEUE, run_local
    from jobtide_worker.pipeline_settings import PipelineSettings, SettingsError

    parser = argparse.ArgumentParser(
        prog="python -m jobtide_worker run-local",
        description="Run a handler on tasks (one JSON value per line) as the worker would, "
        "with no broker: the same Task, retries and dead letters, and log lines (stderr). "
        "Dead-lettered tasks are printed to standard output, one JSON object per line. "
        "Exit code 0 when every task was done, 1 when some were dead-lettered.",
    )
    parser.add_argument(
        "--handler",
        default="handler:handle",
        help="module:function; modules are looked up in the current directory first",
    )
    parser.add_argument("--queue", default=DEFAULT_QUEUE, help="the queue the tasks come from")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=PipelineSettings().max_attempts,
        help="deliveries of a failing task before it is dead-lettered (the pipeline's maxAttempts)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument(
        "file", nargs="?", help="the tasks, one JSON value per line (default: standard input)"
    )
    args = parser.parse_args(argv)
    try:
        PipelineSettings(max_attempts=args.max_attempts)
        if args.file is None:
            tasks = list(_read_tasks(sys.stdin))
        else:
            with open(args.file) as lines:
                tasks = list(_read_tasks(lines))
    except (SettingsError, OSError, ValueError) as e:
        print(f"jobtide-worker run-local: {e}", file=sys.stderr)
        return EXIT_CONFIG
    log = EventLog(args.log_format)
    try:
        handler = load_handler(args.handler, path=os.getcwd())
    except HandlerLoadError as e:
        log.event(ERROR, "handler could not be loaded", handler=args.handler, error=str(e))
        return EXIT_HANDLER
    result = run_local(handler, tasks, queue=args.queue, max_attempts=args.max_attempts, log=log)
    for dead in result.dead_letters:
        print(json.dumps({"task": dead.task, "headers": dict(dead.headers)}, default=str))
    return 0 if result.ok else EXIT_DEAD_LETTERED


def _read_tasks(lines: TextIO) -> Iterator[Any]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as e:
            raise ValueError(f"line {number}: not JSON: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
