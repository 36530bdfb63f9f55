"""trafficgen: requests the frontend page in a loop at $RATE per second (at most 50) and
prints a summary every $REPORT_SECONDS: how many answers of each status and reviews version."""

import collections
import os
import re
import time
import urllib.error
import urllib.request

from demohttp import UpstreamError, service_url

RATE = min(float(os.environ.get("RATE", "2")), 50.0)
REPORT_SECONDS = float(os.environ.get("REPORT_SECONDS", "10"))
VERSION = re.compile(rb"reviews (v\d) from")


def request(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            match = VERSION.search(response.read())
            return f"200 reviews-{match.group(1).decode()}" if match else "200"
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except OSError as exc:
        return f"error {type(exc).__name__}"


def main() -> None:
    try:
        url = service_url("frontend", "/")
    except UpstreamError as exc:
        raise SystemExit(f"trafficgen: {exc}") from None
    print(f"trafficgen: GET {url} {RATE:g}/s", flush=True)
    counts = collections.Counter()
    next_report = time.monotonic() + REPORT_SECONDS
    while True:
        started = time.monotonic()
        counts[request(url)] += 1
        if started >= next_report:
            summary = ", ".join(f"{outcome}: {n}" for outcome, n in sorted(counts.items()))
            print(f"trafficgen: last {REPORT_SECONDS:g}s: {summary}", flush=True)
            counts.clear()
            next_report = started + REPORT_SECONDS
        time.sleep(max(0.0, 1.0 / RATE - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
