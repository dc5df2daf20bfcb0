"""The benchmarks' streaming client against a real socket server that drops connections."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from workloads.bench.load import CLIENT_RETRIES, OnlineLoad

SSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": "b"}]}\n\ndata: [DONE]\n\n'
)


def serve(drops: int) -> tuple[int, list[str]]:
    """A server on a free port that reads each request, closes the first `drops` connections
    without a byte (as a proxy closing an idle keep-alive connection does), then streams."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def read_request(conn: socket.socket) -> None:  # all of it: closing with unread bytes resets
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                      if k.strip().lower() == b"content-length")  # fmt: skip
        while len(body) < length:
            body += conn.recv(65536)

    def loop() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                read_request(conn)
                seen.append("dropped" if len(seen) < drops else "answered")
                if seen[-1] == "answered":
                    conn.sendall(SSE)
                conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=loop, daemon=True).start()
    return listener.getsockname()[1], seen


def first_request(drops: int):
    port, seen = serve(drops)
    load = OnlineLoad(f"http://127.0.0.1:{port}", "m", clients=1, max_tokens=2)
    thread = load.run()
    deadline = time.monotonic() + 10
    while not (load.requests and load.requests[0].end) and time.monotonic() < deadline:
        time.sleep(0.01)
    load.stop.set()
    thread.join(timeout=10)
    return load.requests[0], seen


@pytest.mark.parametrize("drops", [1, CLIENT_RETRIES])
def test_a_connection_dropped_before_any_response_is_sent_again(drops):
    req, seen = first_request(drops)
    assert req.ok and req.tokens == 2 and req.retries == drops
    assert seen[: drops + 1] == ["dropped"] * drops + ["answered"]


def test_past_its_retries_the_request_fails_and_says_why():
    req, seen = first_request(CLIENT_RETRIES + 1)
    assert not req.ok and req.retries == CLIENT_RETRIES and req.status is None
    assert seen[: CLIENT_RETRIES + 1] == ["dropped"] * (CLIENT_RETRIES + 1)
    assert "RemoteProtocolError" in req.error
