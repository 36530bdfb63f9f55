"""`python -m ambientctl` / the `ambientctl` console script."""

from __future__ import annotations

import sys

from ambientctl.cli import main

if __name__ == "__main__":
    sys.exit(main())
