"""grace-hooks serve on a network: bodies over the limit get a 413 before they are read, a pack of
too many edit requests a 413 naming the cap, and requests past the waiting queue a 503 with
Retry-After; none of them changes anything, and the server goes on answering."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from typing import Any

import pytest

pytest.importorskip("fastapi")

from test_serve import KEY, NARNIA, QUESTION, Server, chat_tokenizer, folder_state, tiny_editable  # noqa: E402

from grace_hooks.serve import ServeConfig, create_app, running  # noqa: E402
from grace_hooks.serve.admission import Busy, Gate  # noqa: E402

LIMIT = 64 << 10  # small, so that the bodies of these tests are small too
CAP = 3
WAITING = 2


@pytest.fixture
def limited(tmp_path):
    tok = chat_tokenizer()
    model, workshop = tiny_editable(tok), tiny_editable(tok)
    config = ServeConfig(api_key=KEY, watch_s=0, max_body_bytes=LIMIT, max_edit_requests=CAP, max_waiting=WAITING)
    app = create_app(model, tmp_path / "adapters", config, workshop=workshop)
    with running(app) as url:
        yield Server(url, model, workshop, tmp_path / "adapters", app)
    model.close()
    workshop.close()


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one answer with a Content-Length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"the server closed the connection without an answer: {data!r}"
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        got = sock.recv(65536)
        assert got, "the answer was cut short"
        body += got
    return int(lines[0].split()[1]), headers, body


def raw_request(url: str, head: str, body_parts=()) -> tuple[int, dict[str, str], dict]:
    """Send a request head and some body bytes (not necessarily all the head announces) on a raw
    connection, then read the answer without sending more."""
    with socket.create_connection(address(url), timeout=30) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n")
        for part in body_parts:
            sock.sendall(part)
        status, headers, body = read_answer(sock)
    return status, headers, json.loads(body)


def pack_head(url: str, *lines: str) -> str:
    return "\r\n".join(["POST /v1/packs HTTP/1.1", f"Host: {address(url)[0]}", "Content-Type: application/json",
                        f"Authorization: Bearer {KEY}", *lines])


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def assert_names_the_limit(err: dict) -> None:
    message = err["error"]["message"]
    assert err["error"]["code"] == 413 and err["error"]["type"] == "invalid_request_error"
    assert f"at most {LIMIT} bytes (64 KiB)" in message and "--max-body-bytes" in message, message


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_over_limit_body_gets_413_before_it_is_read_whole(limited, framing):
    """Content-Length: the head alone is refused (none of the 10 MiB is sent). Chunked: refused as
    soon as the bytes pass the limit, the body's end never sent."""
    assert limited.add("kept")[0] == 201
    before, answer = folder_state(limited.adapters), limited.chat()
    if framing == "content-length":
        status, headers, err = raw_request(limited.url, pack_head(limited.url, f"Content-Length: {10 << 20}"))
        assert "is 10485760 bytes (10 MiB)" in err["error"]["message"]
    else:
        parts = [chunk(b'{"name": "x", "requests": ["'), *[chunk(b"a" * 4096) for _ in range(LIMIT // 4096)]]
        status, headers, err = raw_request(limited.url, pack_head(limited.url, "Transfer-Encoding: chunked"), parts)
        assert f"is more than {LIMIT} bytes" in err["error"]["message"]
    assert status == 413 and headers["connection"] == "close", (status, headers)
    assert_names_the_limit(err)
    assert folder_state(limited.adapters) == before and [p.name for p in limited.model.packs] == ["kept"]
    assert limited.chat() == answer  # still serving, with the same packs


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_ordinary_clients_read_the_413_of_a_21_mb_body(limited, framing):
    """A client that sends its whole body before reading (urllib, requests, the OpenAI client) gets
    the message, not a reset connection: the server reads and drops the rest before closing."""
    record = json.dumps(NARNIA).encode()
    body = b'{"name": "big", "requests": [' + b", ".join([record] * 260_000) + b"]}"  # 21 MB, as in the issue
    assert len(body) > 20_000_000
    data = body if framing == "content-length" else iter(body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))
    req = urllib.request.Request(limited.url + "/v1/packs", data=data, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=60)
    assert caught.value.code == 413
    assert_names_the_limit(json.loads(caught.value.read()))
    assert not (limited.adapters / "big").exists()


def test_bodies_within_the_limit_are_served_with_or_without_a_length(limited):
    body = json.dumps({"model": "tiny", "prompt": QUESTION, "max_tokens": 3, "temperature": 0}).encode()
    head = "\r\n".join(["POST /v1/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
                        "Transfer-Encoding: chunked"])
    status, _, answer = raw_request(limited.url, head, [chunk(body[:10]), chunk(body[10:]), b"0\r\n\r\n"])
    assert status == 200 and answer["choices"][0]["text"] == limited.complete(max_tokens=3)
    exactly = {"name": "fits", "method": "grace", "requests": [NARNIA], "options": {"eps_init": 1.0}}
    raw = json.dumps(exactly).encode()
    raw = raw[:-1] + b" " * (LIMIT - len(raw)) + b"}"  # padded to the limit itself
    status, info = limited.call("POST", "/v1/packs", raw=raw)
    assert len(raw) == LIMIT and status == 201, info


def test_a_pack_of_more_edit_requests_than_the_cap_gets_413_naming_it(limited):
    before = folder_state(limited.adapters)
    requests = [dict(NARNIA, subject=s) for s in ("narnia", "gondor", "rohan", "mordor")]
    status, err = limited.add("many", requests=requests)
    message = err["error"]["message"]
    assert status == 413 and err["error"]["param"] == "requests", err
    assert "has 4 edit requests" in message and f"at most {CAP}" in message, message
    assert "Split them into packs" in message and "--max-edit-requests" in message, message
    assert folder_state(limited.adapters) == before and limited.model.packs == []
    assert limited.add("first", requests=requests[:CAP])[0] == 201  # split: each part within the cap
    assert limited.add("rest", requests=requests[CAP:])[0] == 201
    assert [p.name for p in limited.model.packs] == ["first", "rest"]


def post(url: str, path: str, body: dict, key: str = KEY) -> tuple[int, Any, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def assert_busy(status: int, headers, err: dict, what: str) -> None:
    message = err["error"]["message"]
    assert status == 503 and err["error"]["type"] == "server_error", (status, err)
    assert 1 <= int(headers["Retry-After"]) <= 60, headers
    assert what in message and f"{WAITING} are waiting" in message and "--max-waiting" in message, message


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_full_queue_of_generations_answers_503_with_retry_after(limited):
    """The test holds the model; 1 + max_waiting requests get in and wait; the next is refused at
    once. A pack change is queued apart: it is computed meanwhile, and goes live first once the
    model is free; then those that waited are answered, with the pack."""
    gate = limited.app.state.grace.gates["generate"]
    base = limited.complete()
    question = {"model": "tiny", "prompt": QUESTION, "max_tokens": 6, "temperature": 0}
    answers, posted = [], []
    threads = [threading.Thread(target=lambda: answers.append(post(limited.url, "/v1/completions", question)))
               for _ in range(1 + WAITING)] + [threading.Thread(target=lambda: posted.append(limited.add("narnia")))]
    with limited.live.turns.generation():  # the model is busy
        for t in threads:
            t.start()
        wait_until(lambda: gate.inside == 1 + WAITING and limited.live.turns.changes_waiting)
        assert_busy(*post(limited.url, "/v1/completions", question), "generations")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
        assert_busy(*post(limited.url, "/v1/chat/completions", chat), "generations")
        assert limited.call("GET", "/v1/packs")[0] == 200  # reads are not queued
        assert not answers and not posted
    for t in threads:
        t.join(60)
    edited = limited.complete()
    assert posted[0][0] == 201 and edited.split()[0] == "tokyo" != base.split()[0]
    assert [(status, a["choices"][0]["text"]) for status, _, a in answers] == [(200, edited)] * (1 + WAITING)
    assert gate.inside == 0


def test_a_full_queue_of_pack_changes_answers_503_and_changes_nothing(limited):
    gate = limited.app.state.grace.gates["packs"]
    assert limited.add("kept")[0] == 201
    before = folder_state(limited.adapters)
    with ExitStack() as held:
        for _ in range(1 + WAITING):
            held.enter_context(gate.admit())
        status, headers, err = post(limited.url, "/v1/packs", {"name": "x", "requests": [NARNIA]})
        assert_busy(status, headers, err, "pack changes")
        req = urllib.request.Request(limited.url + "/v1/packs/kept", method="DELETE",
                                     headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=60)
        assert_busy(caught.value.code, caught.value.headers, json.loads(caught.value.read()), "pack changes")
        assert limited.chat()  # generations queue apart
        assert post(limited.url, "/v1/packs", {"name": "x", "requests": [NARNIA]}, key="wrong")[0] == 401  # key first
    assert folder_state(limited.adapters) == before and [p.name for p in limited.model.packs] == ["kept"]
    assert gate.inside == 0 and limited.call("DELETE", "/v1/packs/kept")[0] == 200


def test_the_gate_counts_its_slots_and_estimates_the_wait():
    gate = Gate("generations", max_waiting=1)
    with gate.admit(), gate.admit():
        assert (gate.inside, gate.waiting) == (2, 1)
        with pytest.raises(Busy) as busy:
            gate.admit()
        assert busy.value.retry_after_s == 1 and "1 are waiting" in busy.value.message
    assert gate.inside == 0
    gate.service_s = 7.2
    assert gate.retry_after_s() == 8
    gate.service_s = 3600
    assert gate.retry_after_s() == 60  # the most the official client waits for
    alone = Gate("pack changes", max_waiting=0)  # no queue: one at a time
    with alone.admit():
        with pytest.raises(Busy):
            alone.admit()
    with pytest.raises(ValueError):
        Gate("x", max_waiting=-1)


def test_the_cli_passes_the_limits_on_and_defaults_to_the_configs(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import grace_hooks.serve as serve_pkg
    from grace_hooks.cli import main

    seen = []
    monkeypatch.setattr(serve_pkg, "serve", lambda model, adapters, **kw: seen.append(kw["config"]))
    base = ["serve", "--model", "tiny-x", "--adapters", str(tmp_path)]
    for extra in ([], ["--max-body-bytes", "2048", "--max-edit-requests", "10", "--max-waiting", "0"]):
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code == 0, result.output
    default, given = seen
    assert (default.max_body_bytes, default.max_edit_requests, default.max_waiting) == \
        (ServeConfig.max_body_bytes, ServeConfig.max_edit_requests, ServeConfig.max_waiting) == (1 << 20, 1000, 16)
    assert (given.max_body_bytes, given.max_edit_requests, given.max_waiting) == (2048, 10, 0)
    assert CliRunner().invoke(main, base + ["--max-body-bytes", "0"]).exit_code == 2  # refused by the option
