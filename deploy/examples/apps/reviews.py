"""reviews: two reviews of the book; $VERSION v1 shows no stars, v2 black and v3 red stars
from the ratings service (bookinfo's reviews v1/v2/v3)."""

import os

from demohttp import POD, UpstreamError, fetch_json, json_response, serve

VERSION = os.environ.get("VERSION", "v1")
STAR_COLOR = {"v2": "black", "v3": "red"}.get(VERSION)
REVIEWS = {
    "Reviewer1": "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
    "Reviewer2": "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
}


def handle(path: str):
    if path == "/health":
        return json_response({"status": "Reviews is healthy"})
    ratings, problem = {}, None
    if STAR_COLOR is not None:
        try:
            ratings = fetch_json("ratings", "/ratings/0")["ratings"]
        except UpstreamError as exc:
            problem = str(exc)
    reviews = []
    for reviewer, text in REVIEWS.items():
        review = {"reviewer": reviewer, "text": text}
        if STAR_COLOR is not None:
            review["rating"] = (
                {"stars": ratings[reviewer], "color": STAR_COLOR}
                if reviewer in ratings
                else {"error": f"Ratings service is currently unavailable ({problem})"}
            )
        reviews.append(review)
    return json_response({"id": 0, "version": VERSION, "pod": POD, "reviews": reviews})


if __name__ == "__main__":
    serve(f"reviews-{VERSION}", handle)
