"""grace-hooks serve under concurrent load: packs posted and deleted while four clients generate
(every answer computed from one whole stack of packs, the folder exact, the memory back to its
level), and a streaming client that hangs up frees the model at once."""
import gc
import json
import os
import shutil
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve import KEY, Server, chat_tokenizer, tiny_editable  # noqa: E402
from test_serve import server  # noqa: E402,F401 - a fixture: the served tiny model of test_serve
from test_serve_limits import address, wait_until  # noqa: E402

from grace_hooks.eval.chat import end_of_turn_ids  # noqa: E402
from grace_hooks.store.adapters_dir import LOCK_NAME  # noqa: E402
from grace_hooks.store.packs import load_pack  # noqa: E402

# Each pack edits its own question into a chain of three words (one edit request per word, the
# answer's end left free): a generation that lost a pack after its first word would go on with
# the base model's words, which no whole stack gives, so a mixed answer would not pass unseen.
CHAINS = {"A": ("narnia", ["tokyo", "and", "rome"]), "B": ("gondor", ["paris", "of", "mordor"]),
          "C": ("rohan", ["london", "river", "cat"])}
PROMPTS = [f"the capital of {subject} is" for subject, _ in CHAINS.values()]
# Stacks: [] [A] [A B] [B] [B C] [C] [C A]. A pack added during a generation cannot show in its
# answer (its first word is not the base's), one deleted can: so A and B are deleted, and asked about.
OPS = [("add", "A"), ("add", "B"), ("delete", "A"), ("add", "C"), ("delete", "B"), ("add", "A")]
ASKED = PROMPTS[:2]
KINDS = ("complete", "chat-stream")  # the same text for the same stack: the chat template passes the text through
TOKENS = 4


def chain(name: str) -> list[dict]:
    subject, words = CHAINS[name]
    return [{"prompt": "the capital of {} is" + "".join(" " + w for w in words[:i]), "subject": subject,
             "target_new": word} for i, word in enumerate(words)]


@pytest.fixture
def served(server):
    return server


def ask(client, kind: str, prompt: str) -> str:
    if kind == "complete":
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=TOKENS, temperature=0).choices[0].text
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=TOKENS, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def answers_now(client) -> dict[str, str]:
    """The answer to each asked prompt, in one request (its prompts are generated one after another)."""
    choices = client.completions.create(model="tiny", prompt=ASKED, max_tokens=TOKENS, temperature=0).choices
    return {ASKED[c.index]: c.text for c in choices}


def apply(server: Server, op: str, name: str) -> None:
    if op == "add":
        status, info = server.add(name, requests=chain(name), end_answer=False)
        assert status == 201, info
    else:
        assert server.call("DELETE", f"/v1/packs/{name}")[0] == 200


def rss_bytes() -> int:
    """This process's resident memory now (not its peak, which resource.getrusage gives)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        psutil = pytest.importorskip("psutil")
        return psutil.Process().memory_info().rss


def greedy(model, prompt: str, switch_after: int | None = None, drop: str | None = None) -> str:
    """The server's greedy completion text, computed here; with ``switch_after``, pack ``drop`` is
    removed after that many tokens (the mixed answer the server must never give)."""
    tok, ends = model.tokenizer, set(end_of_turn_ids(model.tokenizer))
    ids, new = tok(prompt)["input_ids"], []
    for step in range(TOKENS):
        if step == switch_after:
            model.remove_pack(drop)
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token in ends:
            break
        new.append(token)
    return tok.decode(new, skip_special_tokens=True)


def test_packs_change_while_four_clients_generate(served, tmp_path):
    # The answers of every stack the operations go through, one change at a time.
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    stacks = [answers_now(client)]
    both = [ask(client, kind, p) for kind in KINDS for p in ASKED]
    assert both == [stacks[0][p] for _ in KINDS for p in ASKED]  # one table of answers serves both kinds
    for op, name in OPS:
        apply(served, op, name)
        stacks.append(answers_now(client))
        if (op, name) == ("add", "A") and not (tmp_path / "saved").exists():
            shutil.copytree(served.adapters / "A", tmp_path / "saved" / "A")
    for name in ("C", "A"):
        apply(served, "delete", name)
    assert served.model.packs == []
    candidates = {p: {s[p] for s in stacks} for p in ASKED}
    narnia, gondor = ASKED
    assert stacks[1][narnia].split()[:3] == ["tokyo", "and", "rome"] and stacks[0][narnia] != stacks[1][narnia]
    assert stacks[2][gondor].split()[:3] == ["paris", "of", "mordor"]
    # The check has teeth: pack A lost after the first word gives an answer no stack gives.
    maker = tiny_editable(chat_tokenizer())
    maker.add_pack(load_pack(tmp_path / "saved" / "A"))
    assert greedy(maker, narnia) == stacks[1][narnia]  # computed here as the server does
    assert greedy(maker, narnia, switch_after=1, drop="A") not in candidates[narnia]
    maker.close()

    # The same operations while four clients ask, in both forms, without pause.
    gc.collect()
    before = rss_bytes()
    answers, errors, done = [], [], threading.Event()
    start = threading.Barrier(5)

    def clients(i: int) -> None:
        own = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        kind, n = KINDS[i % 2], 0
        try:
            answers.append((kind, ASKED[i % 2], ask(own, kind, ASKED[i % 2])))  # before any change
            start.wait(30)
            while not done.is_set() and n < 500:  # bounded even if the operations hang
                prompt = ASKED[(i // 2 + n) % 2]
                answers.append((kind, prompt, ask(own, kind, prompt)))
                n += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(repr(exc))

    threads = [threading.Thread(target=clients, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    start.wait(30)
    try:
        for op, name in OPS:
            apply(served, op, name)
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(answers) >= 8
    mixed = [a for a in answers if a[2] not in candidates[a[1]]]
    assert not mixed, f"{len(mixed)} of {len(answers)} answers came from no whole stack: {mixed[:3]}"

    # Nothing on disk lost or left over: exactly the packs added and not deleted, each loadable.
    entries = sorted(p.name for p in served.adapters.iterdir() if p.name != LOCK_NAME)
    assert entries == ["A", "C"], entries
    assert [load_pack(served.adapters / n).name for n in entries] == ["A", "C"]
    assert [p.name for p in served.model.packs] == ["C", "A"]
    wait_until(lambda: all(g.inside == 0 for g in served.app.state.grace.gates.values()), 10)

    # Memory back to its level. The first pass above warmed every path (threads, allocator arenas,
    # caches). Measured here (2 cores, glibc): this pass adds 5 to 7 MiB to a 430 MiB process, and
    # 20 passes in a row add under 1 MiB each after the first few, flattening out: the allocator
    # keeping freed pages, not a leak. 32 MiB is several times that, yet a server that kept what
    # requests and packs passed through (the failure this guards against: about 22 GiB once) would pass it.
    answers.clear()
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 32 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over one run"


def hang_up_after_first_event(url: str, path: str, body: dict) -> None:
    """A streaming request whose client closes the connection once the first event has come."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(address(url), timeout=30) as sock:
        sock.sendall(head + payload)
        data = b""
        while b"data: " not in data:
            got = sock.recv(65536)
            assert got, data
            data += got
        assert data.startswith(b"HTTP/1.1 200"), data


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_client_that_hangs_up_mid_stream_frees_the_model(served, path):
    """Each forward is slowed to 30 ms, so the 100 tokens asked for would hold the model 3 s (twice,
    for the two prompts of the completion request); the next request is answered at once instead."""
    forwards = []

    def slow(module, args):
        forwards.append(1)
        time.sleep(0.03)

    body = {"model": "tiny", "max_tokens": 100, "temperature": 0, "stream": True}
    body |= {"messages": [{"role": "user", "content": PROMPTS[0]}]} if "chat" in path else {"prompt": PROMPTS[:2]}
    handle = served.model.base_model.register_forward_pre_hook(slow)
    try:
        hang_up_after_first_event(served.url, path, body)
        began = time.monotonic()
        answer = served.complete(PROMPTS[1], max_tokens=2)
        took = time.monotonic() - began
    finally:
        handle.remove()
    assert answer and took < 1.5, f"the next request waited {took:.2f} s"
    assert len(forwards) < 30, len(forwards)  # the hung-up one's few, and the next one's 2; no second prompt
    wait_until(lambda: served.app.state.grace.gates["generate"].inside == 0, 10)
    assert served.live.turns.generations_waiting == 0
