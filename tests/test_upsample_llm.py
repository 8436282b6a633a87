"""The OpenAI-compatible upsampling client against a scripted chat server on loopback.

The server (http.server in a thread, port 0) records every request and answers from a script of
canned replies, so retries, Retry-After, timeouts and malformed answers are exercised over real
HTTP without any network. Backoff sleeps are recorded, not slept, except in the timeout tests.
"""

import argparse
import http.server
import importlib.util
import json
import logging
import socket
import threading
import os
import time

import pytest

from dalle3_jax.data.world import parse_caption
from dalle3_jax.upsample import llm

KEY = "sk-test-not-a-real-key"
GOOD = "Two large green stars sit at the top left and the bottom right. The background is plain gray, and nothing else is in the image."
SHORT = "A green star."
LONG = " ".join(["word"] * 90)


def reply(content=None, status=200, body=None, headers=None, delay=0.0):
    """One scripted answer: a chat completion with `content`, or a raw body with a status."""
    if body is None:
        body = json.dumps({"id": "x", "object": "chat.completion",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}]})
    return {"status": status, "body": body, "headers": headers or {}, "delay": delay}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        server = self.server
        length = int(self.headers.get("Content-Length", 0))
        server.requests.append({"path": self.path, "headers": dict(self.headers),
                                "json": json.loads(self.rfile.read(length))})
        step = server.script.pop(0) if len(server.script) > 1 else server.script[0]  # the last one repeats
        time.sleep(step["delay"])
        data = step["body"].encode()
        try:
            self.send_response(step["status"])
            for k, v in step["headers"].items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True  # a handler still sleeping after a client timeout must not block close
    srv.requests, srv.script = [], [reply(GOOD)]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def make(srv, sleeps=None, **overrides):
    settings = dict(base_url=srv.base_url, model="test-model", api_key_env="TEST_LLM_KEY", timeout_s=5.0,
                    max_retries=2, backoff_s=0.01, backoff_max_s=0.5)
    cfg = llm.LLMConfig(**{**settings, **overrides})
    return llm.LLMUpsampler(cfg, sleep=(sleeps.append if sleeps is not None else time.sleep))


def test_success_and_request(server, caplog):
    server.script = [reply(f'  "{GOOD}"\n\nHere is another option: ...')]
    with caplog.at_level(logging.DEBUG, logger="dalle3_jax"):
        result = make(server, temperature=0.3, max_tokens=99).upsample_one("two green stars")
    assert result == llm.UpsampleResult(prompt="two green stars", text=GOOD, valid=True,
                                        words=len(GOOD.split()), attempts=1)
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["json"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("test-model", 0.3, 99)
    msgs = body["messages"]
    assert msgs[0] == {"role": "system", "content": llm.SYSTEM_PROMPT}
    assert "15 to 80 words" in msgs[0]["content"]
    for i, (short, long) in enumerate(llm.FEW_SHOTS):
        assert msgs[1 + 2 * i: 3 + 2 * i] == [{"role": "user", "content": short},
                                              {"role": "assistant", "content": long}]
    assert msgs[-1] == {"role": "user", "content": "two green stars"}
    assert KEY not in caplog.text and KEY not in repr(result)


def test_no_key_env_sends_no_authorization(server):
    cfg = llm.LLMConfig(base_url=server.base_url + "/", model="m", api_key_env="")
    assert llm.upsample(["two green stars"], cfg) == [GOOD]
    assert "Authorization" not in server.requests[0]["headers"]
    assert server.requests[0]["path"] == "/v1/chat/completions"  # trailing slash dropped


def test_retry_on_500_then_success(server):
    server.script = [reply(status=500, body="upstream exploded"), reply(status=502, body="bad gateway"), reply(GOOD)]
    sleeps = []
    assert make(server, sleeps).upsample_one("x").text == GOOD
    assert len(server.requests) == 3
    assert sleeps == pytest.approx([0.01, 0.02])  # exponential backoff


def test_retries_exhausted(server):
    server.script = [reply(status=503, body='{"error": {"message": "overloaded"}}')]
    with pytest.raises(llm.EndpointError, match=r"HTTP 503 after 3 attempts: overloaded") as e:
        make(server, []).upsample_one("x")
    assert e.value.status == 503 and len(server.requests) == 3


def test_429_honours_retry_after_with_cap(server):
    server.script = [reply(status=429, body="slow down", headers={"Retry-After": "0.05"}),
                     reply(status=429, body="slow down", headers={"Retry-After": "100"}), reply(GOOD)]
    sleeps = []
    assert make(server, sleeps).upsample_one("x").valid
    assert sleeps == pytest.approx([0.05, 0.5])  # the server's delay, then capped at backoff_max_s


def test_no_retry_on_400(server):
    server.script = [reply(status=400, body='{"error": {"message": "The model `nope` does not exist"}}')]
    sleeps = []
    with pytest.raises(llm.EndpointError, match=r"HTTP 400: The model `nope` does not exist") as e:
        make(server, sleeps).upsample_one("x")
    assert e.value.status == 400 and len(server.requests) == 1 and sleeps == []


def test_timeout_then_success_and_exhausted(server):
    server.script = [reply(GOOD, delay=0.4), reply(GOOD)]
    sleeps = []
    assert make(server, sleeps, timeout_s=0.1).upsample_one("x").text == GOOD
    assert len(server.requests) == 2 and len(sleeps) == 1
    server.script = [reply(GOOD, delay=0.4)]
    with pytest.raises(llm.EndpointError, match=r"failed after 2 attempts: timed out"):
        make(server, [], timeout_s=0.1, max_retries=1).upsample_one("x")


def test_connection_refused():
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = llm.LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key_env="", max_retries=1, backoff_s=0.0)
    with pytest.raises(llm.EndpointError, match=r"failed after 2 attempts: ConnectionRefusedError"):
        llm.LLMUpsampler(cfg, sleep=lambda s: None).upsample_one("x")


def test_missing_key_env(server, monkeypatch):
    monkeypatch.delenv("TEST_LLM_KEY")
    with pytest.raises(llm.UpsampleError, match=r"environment variable TEST_LLM_KEY is not set"):
        make(server).upsample_one("x")
    assert server.requests == []


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://example.com", "", "http://"])
def test_bad_base_url(url):
    with pytest.raises(llm.UpsampleError, match=r"bad base_url"):
        llm.LLMUpsampler(llm.LLMConfig(base_url=url))


@pytest.mark.parametrize("body", ["<html>oops</html>", "{}", '{"choices": []}', '{"choices": [{"message": {}}]}',
                                  '{"choices": [{"message": {"content": null}}]}'])
def test_malformed_response(server, body):
    server.script = [reply(body=body)]
    with pytest.raises(llm.UpsampleError, match=r"malformed response"):
        make(server, []).upsample_one("x")
    assert len(server.requests) == 1  # a malformed answer is not retried


def test_word_count_retry_once_then_best_effort(server, caplog):
    server.script = [reply(SHORT), reply(GOOD)]
    r = make(server).upsample_one("a star")
    assert (r.text, r.valid, r.attempts) == (GOOD, True, 2)

    server.requests.clear()
    server.script = [reply(LONG), reply(SHORT)]  # 90 words is closer to 15-80 than 3 words
    with caplog.at_level(logging.WARNING, logger="dalle3_jax"):
        r = make(server).upsample_one("a star")
    assert (r.text, r.valid, r.words, r.attempts) == (LONG, False, 90, 2)
    assert len(server.requests) == 2  # only one extra try
    assert "90 words after 2 attempts" in caplog.text


def test_batch_keeps_order_and_logs_progress(server, caplog):
    server.script = [reply(GOOD), reply("  " + GOOD.upper() + "  "), reply(GOOD)]
    with caplog.at_level(logging.INFO, logger="dalle3_jax"):
        out = make(server).upsample(["a", "b", "c"])
    assert out == [GOOD, GOOD.upper(), GOOD]
    assert [r["json"]["messages"][-1]["content"] for r in server.requests] == ["a", "b", "c"]
    assert "upsample 3/3" in caplog.text


def test_clean():
    assert llm.clean('  "Description: one two\nthree"\n\nSecond paragraph.') == "one two three"
    assert llm.clean("Answer: \u201cquoted text\u201d") == "quoted text"


def test_few_shots_are_in_range_and_in_the_captioners_grammar():
    for short, long in llm.FEW_SHOTS:
        assert 15 <= llm.word_count(long) <= 80, short
        facts = parse_caption(long)
        assert any(f[0] == "background" for f in facts), short
        objects = {(f[1], f[2]) for f in facts if f[0] == "colour"}
        assert objects, short
        for shape, colour in objects:  # every object has its count, size and a place
            for kind in ("count", "size", "place"):
                assert any(f[0] == kind and f[1:3] == (shape, colour) for f in facts), (short, kind)


def _sample_cli():
    """launch/sample.py as a module, under its own name (it is a script, not a package member)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "sample.py")
    spec = importlib.util.spec_from_file_location("launch_sample_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_cli_upsample_flags(server, capsys):
    """launch/sample.py's --upsample=llm path (the flags and the rewrite, without loading a model)."""
    cli = _sample_cli()
    parser = argparse.ArgumentParser()
    cli.add_upsample_flags(parser)
    assert cli.upsample_prompts(parser.parse_args([]), ["a red circle"]) == ["a red circle"]
    args = parser.parse_args(["--upsample=llm", "--upsample_base_url", server.base_url, "--upsample_model", "cli-model",
                              "--upsample_api_key_env", "TEST_LLM_KEY"])
    assert cli.upsample_prompts(args, ["two green stars"]) == [GOOD]
    assert server.requests[0]["json"]["model"] == "cli-model"
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert "upsampled 'two green stars' -> " in capsys.readouterr().out
    server.script = [reply(status=401, body='{"error": {"message": "Incorrect API key provided"}}')]
    with pytest.raises(SystemExit, match=r"--upsample=llm: .*HTTP 401: Incorrect API key provided"):
        cli.upsample_prompts(args, ["two green stars"])
