"""A bearer token that is not ASCII is a wrong key like any other: 401 on every protected endpoint, with or
without a body (issue 9, item 4). `secrets.compare_digest` raises TypeError on non-ASCII text, which made
such a token a 500 everywhere. The key is compared as bytes (the header's against the key's UTF-8), so
a non-ASCII API_KEY works too; the route dependency and the body guard use the one comparison.
"""

from __future__ import annotations

import httpx
import pytest

from app.api.security import is_public
from app.core.config import Settings
from app.main import create_app
from tests.reliability._server import api_server

pytestmark = pytest.mark.timeout(300)

ROWS = "text,label\n您好[SEP]我要交话费,缴费\n您好[SEP]网速太慢,投诉\n".encode()
_PATHS = create_app(Settings(api_key="x")).openapi()["paths"]
PROTECTED = [(method.upper(), path) for path, item in _PATHS.items() for method in item if not is_public(path)]
NON_ASCII_TOKENS = ["Bearer ключ".encode(), b"Bearer \xff\xfe", "Bearer s3cret\u00e9".encode("latin-1")]


def test_a_non_ascii_token_is_401_on_every_protected_endpoint(settings):
    assert {("POST", "/datasets"), ("GET", "/datasets"), ("POST", "/classify"), ("POST", "/jobs")} <= set(PROTECTED)
    with api_server(settings, API_KEY="s3cret") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for method, path in PROTECTED:
            url = path.replace("{", "").replace("}", "")  # any id: the key is checked first
            for token in NON_ASCII_TOKENS:
                for body in ({}, {"json": {"model": "x", "text": "a"}}):  # the dependency's check, the guard's
                    response = client.request(method, url, headers={"Authorization": token}, **body)
                    assert response.status_code == 401, (method, path, token, body, response.text)
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    assert response.json() == {"detail": {"message": "missing or wrong bearer API key"}}


def test_a_non_ascii_api_key_is_accepted_before_and_inside_the_routes(settings):
    key = "ключ-доступа"
    with api_server(settings, API_KEY=key) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        good = {"Authorization": f"Bearer {key}".encode()}
        upload = client.post("/datasets", files={"file": ("t.csv", ROWS, "text/csv")}, headers=good)
        assert upload.status_code == 201, upload.text
        assert [d["id"] for d in client.get("/datasets", headers=good).json()] == [upload.json()["id"]]
        # the same characters in another encoding are another key
        wrong = {"Authorization": b"Bearer " + key.encode("cp1251")}
        assert client.get("/datasets", headers=wrong).status_code == 401
        assert client.post("/datasets", files={"file": ("t.csv", ROWS)}, headers=wrong).status_code == 401
