"""`ztunnel --config FILE`: run the node proxy (see ztunnel/config.py for the file's shape)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from meshcore.log import LEVEL_NAMES, configure_logging
from meshcore.process import prepare_for_serving
from ztunnel.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ztunnel", description="Ambient mesh node proxy: mTLS + HBONE for local workloads.")
    parser.add_argument("--config", required=True, type=Path, help="the ztunnel YAML configuration file")
    parser.add_argument("--log-level", default="info", choices=LEVEL_NAMES, help="initial log level (default: info)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    # Imported after logging is set up so that module-level loggers log as JSON.
    from ztunnel.app import Ztunnel

    try:
        config = load_config(args.config)
        ztunnel = Ztunnel(config)
    except ConfigError as exc:
        print(f"ztunnel: {exc}", file=sys.stderr)
        return 2
    prepare_for_serving()
    status = 0
    try:
        trio.run(ztunnel.run)
    except* (ConfigError, OSError) as group:
        # Start-up failures (bad state file, a port in use) end here, inside trio's groups.
        for exc in group.exceptions:
            print(f"ztunnel: {exc}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
