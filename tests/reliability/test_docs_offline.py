"""/docs and /redoc render offline: every script, style sheet and icon they load comes from the service itself
(issue 9, item 9); they used to load Swagger UI and ReDoc from a CDN (floating versions) and fonts from
Google. With API_KEY set, the pages, their assets and /openapi.json stay open."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx
import pytest

from tests.reliability._server import api_server

pytestmark = pytest.mark.timeout(300)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]


def _urls(page: str) -> list[str]:
    parser = _Links()
    parser.feed(page)
    return parser.urls + re.findall(r"url: '([^']+)'", page)  # Swagger UI's spec url, in its inline script


EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


def test_docs_pages_load_everything_from_the_service_without_a_key(settings):
    with api_server(settings, API_KEY="s3cret") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/datasets").status_code == 401  # the key is on
        for page_path, bundle in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            page = client.get(page_path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "http://" not in page.text and "https://" not in page.text, page.text  # no CDN, no fonts
            urls = _urls(page.text)
            assert any(url.endswith(bundle) for url in urls) and "/openapi.json" in urls, urls
            for url in urls:
                assert url.startswith("/") and not url.startswith("//"), url
                asset = client.get(url)
                assert asset.status_code == 200, url
                suffix = url[url.rfind("."):]
                assert EXPECTED_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers)
                assert len(asset.content) > 1000, url
        spec = client.get("/openapi.json").json()
        assert not {"/docs", "/redoc"} & set(spec["paths"])
