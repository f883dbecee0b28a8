"""`python -m jobtide_worker`: run the worker (configuration from the environment).
`python -m jobtide_worker publish --queue Q < tasks.jsonl`: publish one JSON task per line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from jobtide_worker.config import BrokerConfig, ConfigError, WorkerConfig
from jobtide_worker.logs import ERROR, EventLog
from jobtide_worker.runner import EXIT_CONFIG, EXIT_HANDLER, HandlerLoadError, Runner, load_handler


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["publish"]:
        return publish_main(args[1:])
    if args:
        print(f"usage: python -m jobtide_worker [publish --queue Q]; got {args}", file=sys.stderr)
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

    ids = publish(args.queue, tasks, broker=broker, declare=not args.no_declare)
    print(f"published {len(ids)} tasks to {args.queue}", file=sys.stderr)
    return 0


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
