"""frontend: the product page, combining details and reviews (bookinfo's productpage).

200 when both answered; 502 with the page saying which upstream failed otherwise, so
failures show up in status codes and metrics, not only in the HTML.
"""

import html

from demohttp import POD, UpstreamError, fetch_json, serve


def handle(path: str):
    if path == "/health":
        return 200, "text/plain", b"ok\n"
    sections, failed = [], []
    try:
        details = fetch_json("details", "/details/0")
        rows = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in details.items() if k != "pod")
        sections.append(f"<h2>Book details</h2><ul>{rows}</ul><p>details from {html.escape(details['pod'])}</p>")
    except UpstreamError as exc:
        failed.append(str(exc))
        sections.append(f"<h2>Book details</h2><p>Error fetching product details: {html.escape(str(exc))}</p>")
    try:
        reviews = fetch_json("reviews", "/reviews/0")
        items = []
        for review in reviews["reviews"]:
            rating = review.get("rating")
            if rating is None:
                stars = ""
            elif "stars" in rating:
                stars = f" ({rating['color']} stars: {'*' * rating['stars']})"
            else:
                stars = f" ({html.escape(rating['error'])})"
            items.append(f"<li>{html.escape(review['reviewer'])}: {html.escape(review['text'])}{stars}</li>")
        sections.append(
            f"<h2>Book reviews</h2><ul>{''.join(items)}</ul>"
            f"<p>reviews {html.escape(reviews['version'])} from {html.escape(reviews['pod'])}</p>"
        )
    except UpstreamError as exc:
        failed.append(str(exc))
        sections.append(f"<h2>Book reviews</h2><p>Error fetching product reviews: {html.escape(str(exc))}</p>")
    page = (
        "<html><head><title>The Comedy of Errors</title></head><body>"
        f"<h1>The Comedy of Errors</h1>{''.join(sections)}<p>page from {html.escape(POD)}</p></body></html>\n"
    )
    return (502 if failed else 200), "text/html; charset=utf-8", page.encode()


if __name__ == "__main__":
    serve("frontend", handle)
