"""`istiod-lite --source files --dir DIR | --source kube ...`: run the control plane."""

from __future__ import annotations

import sys

import trio

from meshcore.log import configure_logging
from meshcore.process import prepare_for_serving
from istiod_lite.config import parse_args


def main(argv: list[str] | None = None) -> int:
    config, level = parse_args(argv)
    try:
        configure_logging(level)
    except ValueError as exc:
        print(f"istiod-lite: --log-level: {exc}", file=sys.stderr)
        return 2
    from istiod_lite.app import IstiodLite
    from istiod_lite.ca.root import RootError

    try:
        istiod = IstiodLite(config)
    except (RootError, OSError) as exc:
        print(f"istiod-lite: {exc}", file=sys.stderr)
        return 2
    prepare_for_serving()
    status = 0
    try:
        trio.run(_run_until_signal, istiod)
    except* OSError as group:
        for exc in group.exceptions:
            print(f"istiod-lite: {exc}", file=sys.stderr)
        status = 1
    return status


async def _run_until_signal(istiod) -> None:
    import signal

    async with trio.open_nursery() as nursery:
        await nursery.start(istiod.run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                istiod.stop()
                break
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main())
