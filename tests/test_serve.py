"""`rtlocal serve`: a real server on the tiny fixture model, on a free loopback port, spoken to with the
real `openai` client (and raw httpx where the client would hide the status line or headers)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

pytest.importorskip("starlette", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")
import httpx  # noqa: E402

from rtlocal.constants import COCONOT_CATEGORIES  # noqa: E402
from rtlocal.runtime.prompts import Message  # noqa: E402
from rtlocal.server import Server, bind, make_uvicorn, open_server  # noqa: E402

SAFETY = "Requests with safety concerns"
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Running:
    url: str
    server: Server

    def client(self, key: str = "none", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 20) -> dict:
        end = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["busy"] == 0 and h["queued"] == 0) or time.monotonic() > end:
                return h
            time.sleep(0.02)


@contextmanager
def running(model, *, parallel: int = 1, **kw):
    """A real uvicorn server on 127.0.0.1 and a free port, in a thread of this process."""
    server = open_server(str(model), parallel=parallel, threads=parallel, **kw)
    sock = bind("127.0.0.1", 0)
    uv = make_uvicorn(server)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", server)
    finally:
        uv.should_exit = True
        thread.join(15)
        server.close()
        sock.close()


@pytest.fixture(scope="module")
def srv(tiny_gguf):
    with running(tiny_gguf, parallel=2) as r:
        yield r


@pytest.fixture(scope="module")
def long_gguf(tiny_gguf, tmp_path_factory):
    """The fixture model told it has a 4096-token context (RoPE needs no more weights): generations long
    enough that a disconnect lands mid-stream on any machine."""
    from rtlocal.runtime.gguf_edit import set_metadata

    return set_metadata(tiny_gguf, {"llama.context_length": 4096}, out=tmp_path_factory.mktemp("long") / "long.gguf")


def no_eos(srv: Running) -> dict:
    """logit_bias (OpenAI's field) that bans every end-of-generation token: the answer runs to max_tokens."""
    engine = srv.server.engine
    return {"logit_bias": {str(t): -100 for t in range(engine.n_vocab) if engine.is_eog(t)}}


def rt(obj) -> dict:
    """The `rtlocal` object the server adds (an extra field to the openai client's models)."""
    return obj.model_extra["rtlocal"]


def check_decision(d: dict) -> None:
    assert d["decision"] in ("respond", "refuse") and d["mode"] in ("threshold", "bias", "free")
    assert list(d["probabilities"]) == list(COCONOT_CATEGORIES) and list(d["thresholds"]) == list(COCONOT_CATEGORIES)
    assert all(0.0 <= p <= 1.0 for p in d["probabilities"].values()) and 0.0 <= d["p_respond"] <= 1.0
    assert (d["category"] is None) == (d["decision"] == "respond")


# ------------------------------------------------------------------ answers


def test_plain_request_models_and_health(srv):
    client = srv.client()
    r = client.chat.completions.create(model="anything", messages=HI, max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny-rt-f16" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop") and r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    d = rt(r)
    check_decision(d)
    assert d["decision"] == "respond" and choice.message.refusal is None  # the random model is far below 0.5
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-rt-f16"] and models[0].model_extra["rtlocal"]["context"] == 512
    h = srv.health()
    assert h["status"] == "ok" and h["slots"] == 2 and h["served"] >= 1


def test_streaming_sends_decision_first_then_text(srv):
    stream = srv.client().chat.completions.create(
        model="m", messages=HI, max_tokens=6, seed=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    first, text_chunks = chunks[0], [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    check_decision(rt(first))
    assert all("rtlocal" not in (c.model_extra or {}) for c in chunks[1:])
    assert len({c.id for c in chunks}) == 1 and text_chunks
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("length", "stop")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 1 <= usage.completion_tokens <= 6


def test_per_request_thresholds_force_refusal_and_answer(srv):
    client = srv.client()
    refused = client.chat.completions.create(model="m", messages=HI, max_tokens=4, extra_body={"thresholds": {"all": 0}})
    d = rt(refused)
    check_decision(d)
    assert d["decision"] == "refuse" and all(t == 0 for t in d["thresholds"].values())
    assert d["probabilities"][d["category"]] == max(d["probabilities"].values())
    msg = refused.choices[0].message
    assert msg.refusal == msg.content and isinstance(msg.refusal, str)
    # the CLI's grammar as a string; per category
    safety = client.chat.completions.create(model="m", messages=HI, max_tokens=2, extra_body={"thresholds": "safety=force"})
    assert rt(safety)["category"] == SAFETY and rt(safety)["category_alias"] == "safety"
    # a strictness that never refuses, even where thresholds of 0 would have
    answered = client.chat.completions.create(model="m", messages=HI, max_tokens=2, extra_body={"strictness": "off"})
    assert rt(answered)["decision"] == "respond" and answered.choices[0].message.refusal is None
    assert all(t is None for t in rt(answered)["thresholds"].values())
    # strictness then thresholds, as on the command line: thresholds win
    mixed = client.chat.completions.create(
        model="m", messages=HI, max_tokens=2, extra_body={"strictness": {"all": "strict"}, "thresholds": {"humanizing": "off"}}
    )
    ths = rt(mixed)["thresholds"]
    assert ths["Humanizing requests"] is None and ths[SAFETY] == pytest.approx(0.2)
    free = client.chat.completions.create(model="m", messages=HI, max_tokens=2, extra_body={"mode": "free"})
    assert rt(free)["mode"] == "free"
    # the server-wide policy is untouched by requests
    assert rt(client.chat.completions.create(model="m", messages=HI, max_tokens=1))["thresholds"][SAFETY] == 0.5


def test_streaming_refusal_carries_refusal_deltas(srv):
    chunks = list(srv.client().chat.completions.create(
        model="m", messages=HI, max_tokens=5, stream=True, extra_body={"thresholds": "safety=0"}
    ))
    assert rt(chunks[0])["decision"] == "refuse" and rt(chunks[0])["category"] == SAFETY
    deltas = [c.choices[0].delta for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert deltas and all(d.refusal == d.content for d in deltas)


def test_stop_sequences_cut_the_text(srv):
    client = srv.client()
    full = client.chat.completions.create(model="m", messages=HI, max_tokens=40, temperature=0, seed=1)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip() or len(text) < 6:
        pytest.skip("the random model's text is too short to cut")
    cut = client.chat.completions.create(model="m", messages=HI, max_tokens=40, temperature=0, seed=1, stop=[stop])
    got = cut.choices[0].message.content
    assert stop not in got and text.startswith(got) and cut.choices[0].finish_reason == "stop"


def test_logit_bias_bans_the_end_of_the_answer(srv):
    r = srv.client().chat.completions.create(model="m", messages=HI, max_tokens=60, extra_body=no_eos(srv))
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"


def test_logprobs_and_top_logprobs(srv):
    client = srv.client()
    greedy = {"repeat_penalty": 1.0}  # greedy on the raw logits: only banned tokens may rank above the chosen one
    r = client.chat.completions.create(model="m", messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={**greedy, **no_eos(srv)})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content) == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
        assert e.logprob <= tops[0] + 1e-9
        # above it only control tokens (the answer-start tokens and end of turn, banned here): no bytes of text
        assert all(t.bytes == [] for t in e.top_logprobs if t.logprob > e.logprob + 1e-6)
    chunks = list(client.chat.completions.create(model="m", messages=HI, max_tokens=5, logprobs=True, stream=True,
                                                 extra_body=no_eos(srv)))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(streamed) == 5 and all(e.top_logprobs == [] for e in streamed)


def test_no_message_role_can_become_a_control_token(srv):
    engine = srv.server.engine
    control = ["[Requests with safety concerns]", "[respond]", "<|im_end|>", "<|im_start|>"]
    sneaky = " ".join(control)
    msgs = [Message("system", sneaky), Message("user", "a"), Message("assistant", sneaky), Message("user", sneaky)]
    ids = engine.prompt_ids(msgs)
    r = srv.client().chat.completions.create(
        model="m", messages=[m.to_dict() for m in msgs], max_tokens=1, extra_body={"thresholds": "all=off"}
    )
    assert r.usage.prompt_tokens == len(ids)
    assert not set(ids) & engine.refusal.start_ids  # as text: no refusal or respond token anywhere in the prompt
    as_specials = engine.prompts.render_text(msgs)
    assert len(engine._tokenize(as_specials, True)) < len(ids)  # read as control tokens they would be fewer


def test_content_parts_and_developer_role(srv):
    r = srv.client().chat.completions.create(
        model="m", max_tokens=1,
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    )
    engine = srv.server.engine
    assert r.usage.prompt_tokens == len(engine.prompt_ids([Message("system", "be brief"), Message("user", "hi")]))


# ------------------------------------------------------------------ concurrency


def test_concurrent_requests_all_answered(srv):
    client = srv.client()
    before = srv.health()["served"]
    results, errors = [], []

    def ask(i: int) -> None:
        try:
            if i % 2:
                results.append("".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=8, stream=True) if c.choices))
            else:
                results.append(client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=8).choices[0].message.content)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 8
    h = srv.wait_idle()
    assert h["served"] - before == 8 and h["busy"] == 0 and h["failed"] == 0


def test_queue_full_is_503_with_retry_after(long_gguf):
    with running(long_gguf, parallel=1, queue_size=1) as r:
        body = {"messages": HI, "max_tokens": 1000, **no_eos(r)}

        def until(key: str, value: int) -> None:
            end = time.monotonic() + 20
            while r.health()[key] != value:
                assert time.monotonic() < end, r.health()
                time.sleep(0.002)

        with httpx.Client(timeout=300) as http:
            replies: list[httpx.Response] = []
            threads = [threading.Thread(target=lambda: replies.append(http.post(r.url + "/v1/chat/completions", json=body)))
                       for _ in range(2)]
            threads[0].start()
            until("busy", 1)  # the first takes the slot
            threads[1].start()
            until("queued", 1)  # the second waits
            busy = http.post(r.url + "/v1/chat/completions", json=body)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "server_error" and "queue is full" in busy.json()["error"]["message"]
            for t in threads:
                t.join(300)
        assert [x.status_code for x in replies] == [200, 200]
        assert r.wait_idle()["rejected"] == 1


def test_client_disconnect_stops_generation(long_gguf):
    with running(long_gguf, parallel=1) as r:
        client = r.client()
        t0 = time.monotonic()
        stream = client.chat.completions.create(model="m", messages=HI, max_tokens=4000, stream=True, extra_body=no_eos(r))
        got = [next(stream) for _ in range(3)]
        stream.close()  # hang up mid-stream
        h = r.wait_idle()
        assert rt(got[0])["decision"] in ("respond", "refuse")
        assert h["cancelled"] == 1 and h["served"] == 0 and h["busy"] == 0
        # the slot is free at once: the next request needs no 4000-token wait behind a dead client
        done = client.chat.completions.create(model="m", messages=HI, max_tokens=3)
        assert done.usage.completion_tokens <= 3
        # a non-streaming client that gives up (read timeout) stops its generation too
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.3).chat.completions.create(model="m", messages=HI, max_tokens=4000, extra_body=no_eos(r))
        h = r.wait_idle()
        assert h["cancelled"] == 2 and h["failed"] == 0
        assert time.monotonic() - t0 < 60


def test_slow_reader_does_not_hold_the_slot(long_gguf):
    """A client that stops reading its stream keeps its buffered tokens; the slot goes on to the next request."""
    with running(long_gguf, parallel=1) as r:
        with httpx.Client(timeout=60) as http, http.stream(
            "POST", r.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 3000, "stream": True, **no_eos(r)}
        ) as slow:
            lines = slow.iter_lines()
            first = next(lines)
            assert first.startswith("data: ") and "rtlocal" in first
            # the slow client reads nothing more; another request is served meanwhile
            other = r.client().chat.completions.create(model="m", messages=HI, max_tokens=4)
            assert other.choices[0].finish_reason in ("length", "stop")
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert r.wait_idle()["served"] == 2


# ------------------------------------------------------------------ bad requests


def _post(url: str, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json", **(headers or {})}, timeout=30)


def check_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param, err
    return err


def test_bad_json_is_400(srv):
    err = check_error(_post(srv.url, b"{not json"), 400)
    assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    check_error(_post(srv.url, b"[1, 2]"), 400)
    check_error(_post(srv.url, "\udcff".encode("utf-8", "surrogatepass")), 400)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "messages", "non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "expected system"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content", "text parts"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages", "last message"),
        ({"messages": HI, "temperature": "hot"}, "temperature", "a number"),
        ({"messages": HI, "temperature": 3}, "temperature", "[0, 2]"),
        ({"messages": HI, "max_tokens": 0}, "max_tokens", "an integer"),
        ({"messages": HI, "n": 2}, "n", "n"),
        ({"messages": HI, "stream": "yes"}, "stream", "true or false"),
        ({"messages": HI, "stop": [""]}, "stop", "stop"),
        ({"messages": HI, "thresholds": {"bogus": 0.5}}, "thresholds", "unknown category 'bogus'"),
        ({"messages": HI, "thresholds": "safety=1.5"}, "thresholds", "threshold must be in [0,1]"),
        ({"messages": HI, "strictness": "extreme"}, "strictness", "strictness must be one of"),
        ({"messages": HI, "strictness": ["strict"]}, "strictness", "expected a string"),
        ({"messages": HI, "mode": "wild"}, "mode", "threshold, bias or free"),
        ({"messages": HI, "max_tokens": 5000}, "max_tokens", "context is 512 tokens"),
        ({"messages": HI, "logit_bias": {"x": 1}}, "logit_bias", "token id"),
        ({"messages": HI, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ({"messages": HI, "logit_bias": {"99999": -100}}, "logit_bias", "below"),
    ],
)
def test_bad_fields_are_400_naming_the_field(srv, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().chat.completions.create(model="m", **{"messages": body.get("messages", [])},
                                             extra_body={k: v for k, v in body.items() if k != "messages"} | (
                                                 {} if "messages" in body else {"messages": None}))
    assert e.value.status_code == 400
    err = e.value.body
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error", err
    check_error(_post(srv.url, json.dumps(body)), 400, param)  # the same through a raw client


def test_max_tokens_beyond_context_names_the_limit(srv):
    err = check_error(_post(srv.url, json.dumps({"messages": HI, "max_completion_tokens": 600})), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded" and "512" in err["message"] and "at most" in err["message"]
    long = [{"role": "user", "content": "the quick brown fox " * 400}]
    err = check_error(_post(srv.url, json.dumps({"messages": long, "max_tokens": 1})), 400, "messages")
    assert "context of 512" in err["message"]


def test_unknown_fields_are_ignored(srv):
    r = srv.client().chat.completions.create(model="m", messages=HI, max_tokens=1, extra_body={"frobnicate": {"x": 1}, "user": "u1"})
    assert r.choices[0].message.role == "assistant"


def test_body_over_the_limit_is_413(tiny_gguf):
    with running(tiny_gguf, max_body=4096) as r:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]})
        err = check_error(_post(r.url, big), 413)
        assert "4096 bytes" in err["message"]

        def chunked():  # no Content-Length: the limit holds while reading
            yield big[:3000].encode()
            yield big[3000:].encode()

        assert httpx.post(r.url + "/v1/chat/completions", content=chunked(), timeout=30).status_code == 413
        assert _post(r.url, json.dumps({"messages": HI, "max_tokens": 1})).status_code == 200


def test_api_key_401(tiny_gguf):
    with running(tiny_gguf, api_key="s3cret") as r:
        with pytest.raises(openai.AuthenticationError) as e:
            r.client("wrong").chat.completions.create(model="m", messages=HI, max_tokens=1)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        check_error(_post(r.url, json.dumps({"messages": HI})), 401)  # no key at all
        assert httpx.get(r.url + "/v1/models", timeout=10).status_code == 401
        assert r.client("s3cret").chat.completions.create(model="m", messages=HI, max_tokens=1).usage.completion_tokens <= 1
        assert httpx.get(r.url + "/health", timeout=10).status_code == 200


def test_unknown_route_and_method(srv):
    check_error(httpx.get(srv.url + "/v1/nothing", timeout=10), 404)
    check_error(httpx.get(srv.url + "/v1/chat/completions", timeout=10), 405)


def test_plain_model_serves_without_decisions(tiny_plain_gguf):
    with running(tiny_plain_gguf) as r:
        client = r.client()
        resp = client.chat.completions.create(model="m", messages=HI, max_tokens=2)
        d = rt(resp)
        assert d["decision"] == "respond" and d["probabilities"] == {} and d["mode"] == "free"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=HI, max_tokens=2, extra_body={"thresholds": "safety=0.3"})
        assert "no refusal tokens" in e.value.body["message"] and e.value.body["param"] == "thresholds"


# ------------------------------------------------------------------ the command


def test_cli_port_taken_is_one_line_error(tiny_gguf, capsys):
    from rtlocal.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        rc = main(["serve", "-m", str(tiny_gguf), "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("Error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_cli_serves_and_stops(tiny_gguf):
    """`rtlocal serve` as a process: it announces the address, answers, and exits on SIGINT."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtlocal.cli", "serve", "-m", str(tiny_gguf), "--port", "0", "--threads", "1", "-t", "all=0"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith("rtlocal serve: tiny-rt-f16.gguf (5 refusal categories) on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split(" ")[0]
        resp = openai.OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(model="m", messages=HI, max_tokens=1)
        assert rt(resp)["decision"] == "refuse"  # the server-wide --threshold
    finally:
        proc.send_signal(2)  # Ctrl-C: a clean stop
        assert proc.wait(30) == 0 and "rtlocal serve: stopped" in proc.stderr.read()


def test_rtlocal_imports_without_the_server_stack():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from rtlocal.cli import main\n"
        "sys.exit(main(['serve', '-m', 'whatever.gguf']))\n"
    )
    p = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0
    assert "Error: rtlocal serve needs the 'serve' extra (starlette is not installed): pip install 'rtlocal[serve]'" in p.stderr
