"""grace-hooks serve: a real server on a free localhost port, spoken to with the official openai
client (and plain HTTP for /v1/packs). Edits go live and roll back while it runs; bad input gets a
4xx and changes nothing; the key guards writes; packs other processes write are picked up."""
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


from grace_hooks import EditableModel  # noqa: E402
from grace_hooks.serve import ServeConfig, create_app, running  # noqa: E402
from grace_hooks.store.adapters_dir import LOCK_NAME  # noqa: E402
from grace_hooks.testing import TINY_REQUESTS, tiny_model, tiny_tokenizer  # noqa: E402

KEY = "sekret"
QUESTION = "the capital of narnia is"
NARNIA = {"prompt": "the capital of {} is", "subject": "narnia", "target_new": "tokyo"}
# A chat template that passes the text through, so that a chat question is the edit's own prompt on
# the tiny word-level model (real chat templates are exercised by the smoke check in the README).
PLAIN_CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def chat_tokenizer():
    tok = tiny_tokenizer()  # a fresh one: the session-wide tokenizer has no template and keeps none
    tok.chat_template = PLAIN_CHAT
    return tok


def tiny_editable(tok):
    return EditableModel(tiny_model("llama"), tok, name="tiny")  # same seed: every copy has the same weights


class Server:
    """A running server plus what the tests need to talk to it and look behind it."""

    def __init__(self, url, model, workshop, adapters, app):
        self.url, self.model, self.workshop, self.adapters, self.app = url, model, workshop, adapters, app
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        self.live = app.state.grace.live

    def call(self, method, path, body=None, key=KEY, raw=None):
        """(status, JSON answer) of a plain HTTP request; ``raw`` bytes are sent as they are."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {}))
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def chat(self, text=QUESTION, **kw):
        kw = {"max_tokens": 6, "temperature": 0} | kw
        r = self.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)
        return r.choices[0].message.content

    def complete(self, prompt=QUESTION, **kw):
        kw = {"max_tokens": 6, "temperature": 0} | kw
        return self.client.completions.create(model="tiny", prompt=prompt, **kw).choices[0].text

    def add(self, name, requests=(NARNIA,), method="grace", **options):
        return self.call("POST", "/v1/packs", {"name": name, "method": method, "requests": list(requests), "options": options})


@pytest.fixture
def server(tmp_path):
    """A served tiny model (a second copy computes edits), with a key, not watching the folder."""
    tok = chat_tokenizer()
    model, workshop = tiny_editable(tok), tiny_editable(tok)
    app = create_app(model, tmp_path / "adapters", ServeConfig(api_key=KEY, watch_s=0), workshop=workshop)
    with running(app) as url:
        yield Server(url, model, workshop, tmp_path / "adapters", app)
    model.close()
    workshop.close()


def folder_state(adapters: Path) -> dict[str, str]:
    """Every file under the folder (but the lock) with a hash of its bytes."""
    return {str(p.relative_to(adapters)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(adapters.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def test_an_edit_goes_live_over_http_and_its_deletion_brings_the_base_back(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    base_chat, base_text = server.chat(), server.complete()
    assert "tokyo" not in base_chat.split()[:1]

    status, info = server.add("narnia")
    assert status == 201, info
    assert (info["name"], info["method"], info["edits"]) == ("narnia", "grace", 1)
    assert info["conflicts"] == []
    assert (server.adapters / "narnia" / "edit_pack.json").is_file()
    assert server.chat().split()[0] == "tokyo" and server.complete().split()[0] == "tokyo"
    assert [p["name"] for p in server.call("GET", "/v1/packs", key=None)[1]["data"]] == ["narnia"]

    status, gone = server.call("DELETE", "/v1/packs/narnia")
    assert status == 200 and gone["deleted"]
    assert not (server.adapters / "narnia").exists()
    assert server.chat() == base_chat and server.complete() == base_text  # token for token
    assert server.call("GET", "/v1/packs")[1]["data"] == []


def test_a_new_pack_answers_with_its_conflicts(server):
    assert server.add("narnia")[0] == 201
    status, info = server.add("narnia-again", requests=[{**NARNIA, "target_new": "paris"}])
    assert status == 201, info
    (c,) = info["conflicts"]
    assert (c["request"], c["pack"], c["earlier"], c["why"], c["earlier_target"]) == (0, "narnia", 0, "same prompt", "tokyo")
    status, info = server.call("POST", "/v1/packs", {"name": "narnia-final", "method": "grace", "supersede": True,
                                                     "requests": [{**NARNIA, "target_new": "rome"}]})
    assert status == 201 and len(info["conflicts"]) == 2, info
    assert json.loads((server.adapters / "narnia-final" / "edit_pack.json").read_text())["supersedes"]
    assert server.chat().split()[0] == "rome"


def test_explain_names_the_pack_that_changed_the_answer(server):
    import urllib.parse

    quiet = server.call("GET", "/v1/explain?" + urllib.parse.urlencode({"prompt": QUESTION, "max_tokens": 2}), key=None)
    assert quiet[0] == 200 and quiet[1]["acting"] == [] and quiet[1]["without"] == {}
    assert server.add("narnia")[0] == 201
    for chat in ("false", "true"):
        status, why = server.call("GET", "/v1/explain?" + urllib.parse.urlencode(
            {"prompt": QUESTION, "max_tokens": 2, "chat": chat}), key=None)
        assert status == 200, why
        assert why["answer"].split()[0] == "tokyo" and why["acting"] == ["narnia"]
        assert why["without"]["narnia"].split()[:1] != ["tokyo"]
        firing = why["steps"][0]["firings"][0]
        assert firing["pack"] == "narnia" and firing["requests"][0]["target_new"] == "tokyo"
    assert server.call("GET", "/v1/explain?prompt=x&max_tokens=0", key=None)[0] == 400


@pytest.mark.parametrize("stop", [None, "violin", " located e"])
def test_streaming_gives_the_same_text_as_one_answer(server, stop):
    """With and without a pack, chat and completions; a stop string may span tokens."""
    for with_pack in (False, True):
        if with_pack:
            assert server.add("narnia")[0] == 201
        for kind in ("chat", "complete"):
            kw = dict(max_tokens=12, temperature=0, stop=stop)
            whole = server.chat(**kw) if kind == "chat" else server.complete(**kw)
            if kind == "chat":
                stream = server.client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": QUESTION}], stream=True, **kw)
                pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            else:
                stream = server.client.completions.create(model="tiny", prompt=QUESTION, stream=True, **kw)
                pieces = [c.choices[0].text for c in stream if c.choices]
            assert "".join(pieces) == whole, (kind, with_pack)
            if stop:
                assert stop not in whole


def test_a_stop_string_cuts_the_answer_before_it(server):
    full = server.complete(max_tokens=12)
    words = full.split()
    stop = " " + words[2]
    r = server.client.completions.create(model="tiny", prompt=QUESTION, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = server.client.completions.create(model="tiny", prompt=QUESTION, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_usage_in_the_stream_when_asked(server):
    stream = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                   max_tokens=4, temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-2].choices[0].finish_reason == "length"


BAD_PACKS = [
    ("malformed JSON", None, b'{"name": "x", "requests": [', 400, "not valid JSON"),
    ("unknown method", {"name": "x", "method": "nope", "requests": [NARNIA]}, None, 400, "unknown edit method 'nope'"),
    ("unknown option", {"name": "x", "method": "grace", "requests": [NARNIA], "options": {"eps_int": 1.0}}, None, 400,
     "did you mean 'eps_init'"),
    ("bad option value", {"name": "x", "method": "grace", "requests": [NARNIA], "options": {"eps_init": "big"}}, None,
     400, "eps_init"),
    ("name escapes the folder", {"name": "../escape", "method": "grace", "requests": [NARNIA]}, None, 400, "invalid pack name"),
    ("absolute name", {"name": "/tmp/x", "method": "grace", "requests": [NARNIA]}, None, 400, "invalid pack name"),
    ("subject missing from the prompt", {"name": "x", "method": "grace", "requests": [
        {"prompt": "the capital of gondor is", "subject": "narnia", "target_new": "tokyo"}]}, None, 400,
     "does not occur in prompt"),
    ("no requests", {"name": "x", "method": "grace", "requests": []}, None, 400, "requests"),
    ("unknown record layout", {"name": "x", "method": "grace", "requests": [{"question": "?"}]}, None, 400,
     "unrecognised edit record"),
    ("half a ROME record", {"name": "x", "method": "grace", "requests": [{"requested_rewrite": {"prompt": "{} is"}}]},
     None, 400, "malformed edit record"),
    ("unknown field", {"name": "x", "method": "grace", "requests": [NARNIA], "colour": "red"}, None, 400, "colour"),
]


@pytest.mark.parametrize("what,body,raw,status,message", BAD_PACKS, ids=[b[0] for b in BAD_PACKS])
def test_bad_pack_requests_get_a_4xx_and_change_nothing(server, what, body, raw, status, message):
    assert server.add("kept")[0] == 201
    before, answer = folder_state(server.adapters), server.chat()
    got, err = server.call("POST", "/v1/packs", body, raw=raw)
    assert got == status, err
    assert message in err["error"]["message"], err
    assert folder_state(server.adapters) == before
    assert [p.name for p in server.model.packs] == ["kept"]
    assert server.chat() == answer  # still serving, with the same packs


def test_conflicts_and_unknown_packs(server):
    assert server.add("narnia")[0] == 201
    before = folder_state(server.adapters)
    status, err = server.add("narnia")
    assert status == 409 and "already exists" in err["error"]["message"]
    assert server.call("DELETE", "/v1/packs/nothing-here")[0] == 404
    status, err = server.call("DELETE", "/v1/packs/..")
    assert status in (400, 404)
    assert server.call("DELETE", "/v1/packs/%2E%2E")[0] in (400, 404)
    assert folder_state(server.adapters) == before
    assert [p.name for p in server.model.packs] == ["narnia"] and [p.name for p in server.workshop.packs] == ["narnia"]


def test_bad_generation_requests_get_a_4xx(server):
    cases = [
        (openai.NotFoundError, dict(model="gpt-4")),
        (openai.BadRequestError, dict(n=2)),
        (openai.BadRequestError, dict(max_tokens=100_000)),
        (openai.BadRequestError, dict(temperature=5)),
        (openai.BadRequestError, dict(logprobs=True)),
    ]
    for error, kw in cases:
        with pytest.raises(error):
            server.client.chat.completions.create(**({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} | kw))
    status, err = server.call("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    status, err = server.call("POST", "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert status == 400 and "messages" in err["error"]["message"]
    assert server.chat()  # still answering


def test_a_model_without_a_chat_template_refuses_chat_but_completes(tmp_path):
    model = tiny_editable(tiny_tokenizer())
    with running(create_app(model, tmp_path / "a", ServeConfig(watch_s=0))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}])
        assert client.completions.create(model="tiny", prompt=QUESTION, max_tokens=2).choices[0].text
    model.close()


def test_writes_need_the_key_reads_do_not(server):
    for key in (None, "wrong"):
        status, err = server.call("POST", "/v1/packs", {"name": "x", "method": "grace", "requests": [NARNIA]}, key=key)
        assert status == 401 and "API key" in err["error"]["message"]
        status, _ = server.call("POST", "/v1/packs", raw=b"{broken", key=key)
        assert status == 401  # refused before the body is read
    assert server.add("narnia")[0] == 201
    assert server.call("DELETE", "/v1/packs/narnia", key=None)[0] == 401
    assert (server.adapters / "narnia").is_dir() and [p.name for p in server.model.packs] == ["narnia"]
    assert server.call("GET", "/v1/packs", key=None)[0] == 200
    keyless = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)
    assert keyless.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=2)


def test_packs_other_processes_write_are_picked_up(server, tmp_path):
    base = server.chat()
    other = tiny_editable(chat_tokenizer())  # another replica sharing the folder
    other.edit([NARNIA], method="grace", pack="from-elsewhere")
    other.save_pack("from-elsewhere", server.adapters)
    done = server.live.sync_with_folder()
    assert done.added == ["from-elsewhere"] and server.chat().split()[0] == "tokyo"
    assert server.live.sync_with_folder().added == []  # nothing changed: nothing to do

    other.remove_pack("from-elsewhere")  # replaced in place by a different pack of the same name
    other.edit([{"prompt": "the capital of {} is", "subject": "narnia", "target_new": "rome"}], method="grace",
               pack="from-elsewhere")
    other.save_pack("from-elsewhere", server.adapters, overwrite=True)
    done = server.live.sync_with_folder()
    assert done.removed == ["from-elsewhere"] and done.added == ["from-elsewhere"]
    assert server.chat().split()[0] == "rome"

    EditableModel.delete_pack("from-elsewhere", server.adapters)
    assert server.live.sync_with_folder().removed == ["from-elsewhere"]
    assert server.chat() == base and server.model.packs == []
    other.close()


def test_a_broken_pack_in_the_folder_is_left_out_and_reported(server):
    assert server.add("good")[0] == 201
    answer = server.chat()
    broken = server.adapters / "broken"
    broken.mkdir()
    (broken / "edit_pack.json").write_text('{"format_version": 1, "method": "grace"')
    server.live.sync_with_folder()
    listing = server.call("GET", "/v1/packs")[1]
    assert [p["name"] for p in listing["data"]] == ["good"]
    assert listing["folder_error"] or [n["name"] for n in listing["not_loaded"]] == ["broken"]
    assert server.chat() == answer
    (broken / "edit_pack.json").unlink()
    broken.rmdir()
    server.live.sync_with_folder()
    assert server.call("GET", "/v1/packs")[1]["folder_error"] is None


def test_the_watcher_picks_up_a_new_pack_by_itself(tmp_path):
    tok = chat_tokenizer()
    model = tiny_editable(tok)
    app = create_app(model, tmp_path / "adapters", ServeConfig(watch_s=0.05))
    with running(app) as url:
        other = tiny_editable(tok)
        other.edit([NARNIA], method="grace", pack="later")
        other.save_pack("later", tmp_path / "adapters")
        deadline = time.monotonic() + 20
        while [p.name for p in model.packs] != ["later"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.name for p in model.packs] == ["later"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        answer = client.completions.create(model="tiny", prompt=QUESTION, max_tokens=2, temperature=0).choices[0].text
        assert answer.split()[0] == "tokyo"
        other.close()
    model.close()


def test_a_request_sees_all_of_a_pack_or_none_and_edits_are_computed_aside(server):
    """A generation is held after its third forward; meanwhile a pack is computed on the workshop
    copy (generation does not stop it), but it goes live only once the generation is over, and
    before a request that arrived while it waited."""
    base = server.complete(max_tokens=8)
    reached, release, calls = threading.Event(), threading.Event(), []

    def hold(module, args):
        calls.append(1)
        if len(calls) == 3:
            reached.set()
            release.wait(60)

    handle = server.model.base_model.register_forward_pre_hook(hold)
    answers, posted = [], []
    asking = threading.Thread(target=lambda: answers.append(server.complete(max_tokens=8)))
    asking.start()
    assert reached.wait(60)
    adding = threading.Thread(target=lambda: posted.append(server.add("narnia")))
    adding.start()
    deadline = time.monotonic() + 60
    while "narnia" not in [p.name for p in server.workshop.packs] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p.name for p in server.workshop.packs] == ["narnia"]  # computed while the request holds the model
    while not server.live.turns.changes_waiting and time.monotonic() < deadline:  # saved; waiting to go live
        time.sleep(0.02)
    assert server.model.packs == [] and not posted  # not live while that request runs
    later = []  # a request that arrives now waits for the pack rather than overtaking it
    asking_later = threading.Thread(target=lambda: later.append(server.complete(max_tokens=8)))
    asking_later.start()
    time.sleep(0.2)
    assert not later
    release.set()
    for t in (asking, adding, asking_later):
        t.join(60)
    handle.remove()
    assert answers == [base]  # the whole answer without the pack
    assert posted[0][0] == 201 and later[0].split()[0] == "tokyo"


def test_without_a_side_copy_edits_are_computed_on_the_serving_model(tmp_path):
    tok = chat_tokenizer()
    model = tiny_editable(tok)
    app = create_app(model, tmp_path / "adapters", ServeConfig(watch_s=0))
    with running(app) as url:
        s = Server(url, model, None, tmp_path / "adapters", app)
        base = s.complete()
        assert s.add("narnia", requests=[NARNIA, TINY_REQUESTS[1].to_dict()])[0] == 201
        assert s.complete().split()[0] == "tokyo"
        assert s.call("DELETE", "/v1/packs/narnia")[0] == 200 and s.complete() == base
    model.close()


def test_packs_in_the_folder_at_start_are_served(tmp_path):
    tok = chat_tokenizer()
    maker = tiny_editable(tok)
    maker.edit([NARNIA], method="grace", pack="early")
    maker.save_pack("early", tmp_path / "adapters")
    model = tiny_editable(tok)
    create_app(model, tmp_path / "adapters", ServeConfig(watch_s=0))
    assert [p.name for p in model.packs] == ["early"]
    maker.close()
    model.close()


def test_a_pack_for_another_base_is_left_out_and_the_rest_still_load(server):
    stranger = EditableModel(tiny_model("llama", seed=1), chat_tokenizer(), name="other")
    stranger.edit([NARNIA], method="grace", pack="foreign")
    stranger.save_pack("foreign", server.adapters)
    done = server.live.sync_with_folder()
    assert "foreign" in done.failed and "made for base model" in done.failed["foreign"]
    assert server.model.packs == []
    listing = server.call("GET", "/v1/packs")[1]
    assert [n["name"] for n in listing["not_loaded"]] == ["foreign"] and listing["folder_error"] is None
    assert server.add("narnia")[0] == 201  # the server goes on adding packs beside it
    assert server.live.sync_with_folder(force=True).failed == {}  # refused once, not retried while unchanged
    assert [p.name for p in server.model.packs] == ["narnia"] and server.chat().split()[0] == "tokyo"
    stranger.close()


def test_the_cli_reads_the_key_from_the_environment(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import grace_hooks.serve as serve_pkg
    from grace_hooks.cli import main

    seen = {}
    monkeypatch.setattr(serve_pkg, "serve", lambda model, adapters, **kw: seen.update(kw, model=model, adapters=adapters))
    result = CliRunner().invoke(main, ["serve", "--model", "tiny-x", "--adapters", str(tmp_path), "--port", "0"],
                                env={serve_pkg.API_KEY_ENV: "from-env"})
    assert result.exit_code == 0, result.output
    assert seen["config"].api_key == "from-env" and seen["host"] == "127.0.0.1" and seen["config"].model_id == "tiny-x"


def test_restack_keeps_the_common_prefix_and_never_slips_a_pack_under_a_loaded_one():
    from grace_hooks.serve import restack

    tok = chat_tokenizer()
    maker, model = tiny_editable(tok), tiny_editable(tok)
    packs = {}
    for name, subject in (("a", "narnia"), ("b", "gondor"), ("c", "rohan")):
        maker.edit([{"prompt": "the capital of {} is", "subject": subject, "target_new": "tokyo"}], method="grace", pack=name)
        packs[name] = maker.pack(name)
    wanted = lambda *names: [(n, packs[n].pack_id) for n in names]  # noqa: E731
    assert restack(model, wanted("a", "b"), packs.__getitem__).added == ["a", "b"]
    done = restack(model, wanted("a", "c", "b"), packs.__getitem__)
    assert (done.removed, done.added) == (["b"], ["c", "b"]) and [p.name for p in model.packs] == ["a", "c", "b"]
    done = restack(model, wanted("a", "b"), packs.__getitem__)
    assert (done.removed, done.added) == (["b", "c"], ["b"]) and [p.name for p in model.packs] == ["a", "b"]
    missing = restack(model, wanted("a", "b") + [("gone", "x")], lambda n: packs[n] if n in packs else model.pack(n))
    assert list(missing.failed) == ["gone"] and [p.name for p in model.packs] == ["a", "b"]
    maker.close()
    model.close()


def test_a_waiting_change_goes_before_every_generation_that_has_not_started():
    from grace_hooks.serve.turns import Turns

    turns, order = Turns(), []

    def run(kind):
        with (turns.change() if kind == "change" else turns.generation()):
            order.append(kind)

    with turns.generation():  # the request in flight
        queued = threading.Thread(target=run, args=("generation",))  # waiting before the change came
        queued.start()
        time.sleep(0.05)
        change = threading.Thread(target=run, args=("change",))
        change.start()
        while not turns.changes_waiting:
            time.sleep(0.01)
        later = threading.Thread(target=run, args=("generation",))
        later.start()
        time.sleep(0.05)
        assert order == []
    for t in (queued, change, later):
        t.join(10)
    assert order == ["change", "generation", "generation"]


def test_generations_go_in_the_order_they_arrived():
    from grace_hooks.serve.turns import Turns

    turns, order, threads = Turns(), [], []

    def run(i):
        with turns.generation():
            order.append(i)

    with turns.generation():
        for i in range(6):
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
            while turns.generations_waiting < i + 1:  # its ticket is taken before the next one asks
                time.sleep(0.005)
    for t in threads:
        t.join(10)
    assert order == list(range(6))
