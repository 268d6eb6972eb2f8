"""The one error shape stays valid UTF-8 JSON whatever a client put in it."""

import json

from octomil.server.errors import error_body


def test_lone_surrogates_in_an_error_are_escaped() -> None:
    """A response body with a lone surrogate cannot be encoded: the server would fail (500,
    connection reset) while answering the client's error."""
    body = error_body("unknown field '\ud800'", "invalid_request_error", "\udcff", None)
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
    assert json.loads(raw)["error"] == {
        "message": "unknown field '\\ud800'",
        "type": "invalid_request_error",
        "param": "\\udcff",
        "code": None,
    }
