"""An upload is answered at its headers when its sender has no key or its declared size is over the limit,
and a body without a length is cut off with a 413 once it passes the limit: nothing is spooled to disk
(issue 9, item 1). Starlette's multipart parser used to write the whole body to a temporary file before
the route checked anything (a 300 MB body grew a 312 MB temporary file, with or without the key).

A real uvicorn process runs with TMPDIR pointed at a test folder; the test talks raw HTTP/1.1 over a
socket, so it can read the answer before it has sent the body. The server's temporary files are watched
through /proc/<pid>/fd (Python's TemporaryFile has no name in the folder on Linux).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from tests.reliability._server import api_server

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="watches the server through /proc")]

KEY = "s3cret"
BOUNDARY = "guardboundary"
PART_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n"
             "Content-Type: text/csv\r\n\r\ntext,label\r\n").encode()
CHUNK = ("您好请讲[SEP]我要开通流量包,办理开通\n" * 2000).encode()  # about 100 KB of plausible rows
LIMIT = 1_000_000 + 64 * 1024  # MAX_UPLOAD_BYTES and 64 KiB for the form


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def server(tmp_path_factory, spool):
    settings = Settings(data_dir=tmp_path_factory.mktemp("guard") / "data")
    with api_server(settings, API_KEY=KEY, TMPDIR=str(spool), MAX_UPLOAD_BYTES="1000000") as running:
        yield running


def _request_head(port: int, headers: dict[str, str], path: str = "/datasets",
                  content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _read_answer(sock: socket.socket) -> tuple[int, http.client.HTTPMessage, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()  # a server that waits for the body never answers: the socket's timeout fails the test
    return response.status, response.headers, json.loads(response.read())


def _spooled_bytes(pid: int, spool: Path) -> int:
    """Bytes in the files the server holds open in the spool folder (deleted-on-create ones included)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(spool)):
                total += os.stat(fd).st_size
        except OSError:
            continue  # closed meanwhile
    return total


def _push(sock: socket.socket, total: int, *, chunked: bool = False, on_chunk=lambda: None) -> int:
    """Send up to ``total`` bytes of body; stop early once the server has answered or closed. Returns bytes sent."""
    data = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
    sent = 0
    while sent < total:
        if select.select([sock], [], [], 0)[0]:
            break  # an answer is waiting
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(CHUNK)
        on_chunk()
    return sent


def _assert_nothing_spooled(server, spool: Path) -> None:
    assert list(spool.iterdir()) == []
    assert _spooled_bytes(server.process.pid, spool) == 0


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic czNjcmV0"])
def test_an_upload_without_the_key_is_401_at_its_headers(server, spool, authorization):
    headers = {"Content-Length": str(300 * 1024 * 1024)}
    if authorization:
        headers["Authorization"] = authorization
    with _request_head(server.port, headers) as sock:
        status, answer_headers, body = _read_answer(sock)  # not one byte of the body sent
        assert status == 401, body
        assert answer_headers["WWW-Authenticate"] == "Bearer"
        assert body == {"detail": {"message": "missing or wrong bearer API key"}}
        _push(sock, 8 * 1024 * 1024)  # what a client that ignores the answer would go on sending
    _assert_nothing_spooled(server, spool)


def test_an_upload_declaring_more_than_the_limit_is_413_at_its_headers(server, spool):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Length": str(300 * 1024 * 1024)}
    with _request_head(server.port, headers) as sock:
        status, _, body = _read_answer(sock)
        assert status == 413, body
        assert f"{LIMIT} bytes" in body["detail"]["message"] and "MAX_UPLOAD_BYTES" in body["detail"]["message"]
        _push(sock, 8 * 1024 * 1024)
    _assert_nothing_spooled(server, spool)


def test_a_json_body_declaring_more_than_any_valid_request_is_413_at_its_headers(server, spool):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Length": str(1024**3)}
    with _request_head(server.port, headers, path="/jobs", content_type="application/json") as sock:
        status, _, body = _read_answer(sock)  # it used to be read whole into memory, then parsed
        assert status == 413, body
        assert "the largest valid /classify request" in body["detail"]["message"]
    _assert_nothing_spooled(server, spool)


def test_a_chunked_upload_is_stored_within_the_limit_and_cut_off_with_413_past_it(server, spool):
    rows = "text,label\n您好[SEP]我要交话费,缴费\n您好[SEP]网速太慢,投诉\n".encode()
    small = PART_HEAD.replace(b"text,label\r\n", b"") + rows + f"\r\n--{BOUNDARY}--\r\n".encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for content in (small, iter([small[:50], small[50:]])):  # with a length, and chunked (an iterator)
        response = httpx.post(server.url + "/datasets", content=content, headers=headers, timeout=60)
        assert response.status_code == 201, response.text

    most_spooled = 0

    def watch():
        nonlocal most_spooled
        most_spooled = max(most_spooled, _spooled_bytes(server.process.pid, spool))

    total = 64 * 1024 * 1024
    with _request_head(server.port, {"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"}) as sock:
        sock.sendall(f"{len(PART_HEAD):x}\r\n".encode() + PART_HEAD + b"\r\n")
        sent = _push(sock, total, chunked=True, on_chunk=watch)
        status, _, body = _read_answer(sock)
    assert status == 413, body
    assert f"{LIMIT} bytes" in body["detail"]["message"]
    assert sent < total  # answered while the body was still coming
    assert most_spooled <= LIMIT  # the temporary file never grew past the limit
