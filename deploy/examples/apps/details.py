"""details: facts about the book (bookinfo's details service)."""

from demohttp import POD, json_response, serve

BOOK = {
    "id": 0,
    "author": "William Shakespeare",
    "year": 1595,
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
    "ISBN-10": "1234567890",
}


def handle(path: str):
    if path == "/health":
        return json_response({"status": "Details is healthy"})
    return json_response({**BOOK, "pod": POD})


if __name__ == "__main__":
    serve("details", handle)
