"""A forged Host header is never sent back as a redirect target (issue 9, item 10): Starlette builds the
absolute URL of its trailing-slash redirect (GET /datasets/ → /datasets) from the Host header, so
`GET /datasets/` with `Host: evil.example` redirected the client to evil.example. Redirects on the
request's own host are now relative; the slash redirect itself still works."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability._server import api_server

pytestmark = pytest.mark.timeout(300)


def test_a_slash_redirect_is_relative_whatever_the_host_header_says(settings):
    with api_server(settings, API_KEY="s3cret") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        key = {"Authorization": "Bearer s3cret"}
        # uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (a proxy): the scheme is the client's word too
        for host, proto in (("evil.example", None), ("evil.example:8443", "javascript"),
                            (f"127.0.0.1:{server.port}", None)):
            headers = {**key, "Host": host, **({"X-Forwarded-Proto": proto} if proto else {})}
            for method, path, location in (("GET", "/datasets/", "/datasets"),
                                           ("GET", "/jobs/?limit=5", "/jobs?limit=5"),
                                           ("POST", "/jobs/", "/jobs")):
                response = client.request(method, path, headers=headers, follow_redirects=False)
                assert response.status_code == 307, response.text
                assert response.headers["location"] == location, (host, path, response.headers["location"])
        followed = client.get("/datasets/", headers={**key, "Host": "evil.example"}, follow_redirects=True)
        assert followed.status_code == 200 and followed.json() == []
        assert str(followed.url) == f"{server.url}/datasets"
