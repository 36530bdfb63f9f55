"""ratings: the stars two reviewers gave (bookinfo's ratings service)."""

from demohttp import POD, json_response, serve


def handle(path: str):
    if path == "/health":
        return json_response({"status": "Ratings is healthy"})
    return json_response({"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}, "pod": POD})


if __name__ == "__main__":
    serve("ratings", handle)
