"""`waypoint --config FILE`: run the waypoint L7 proxy (see waypoint/settings.py for the file's shape)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from meshcore.log import LEVEL_NAMES, configure_logging
from meshcore.process import prepare_for_serving
from waypoint.settings import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="waypoint", description="Ambient mesh waypoint: the L7 proxy for services bound to it.")
    parser.add_argument("--config", required=True, type=Path, help="the waypoint YAML configuration file")
    parser.add_argument("--address", help="the pod IP to listen on, replacing the file's `address`")
    parser.add_argument("--log-level", default="info", choices=LEVEL_NAMES, help="initial log level (default: info)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    # Imported after logging is set up so that module-level loggers log as JSON.
    from waypoint.app import Waypoint

    try:
        waypoint = Waypoint(load_settings(args.config, address=args.address))
    except ConfigError as exc:
        print(f"waypoint: {exc}", file=sys.stderr)
        return 2
    prepare_for_serving()
    status = 0
    try:
        trio.run(waypoint.run)
    except* (ConfigError, OSError) as group:
        # Start-up failures (an unreadable token file, a port in use) end here, inside trio's groups.
        for exc in group.exceptions:
            print(f"waypoint: {exc}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
