"""``bolt synthesize`` against a fake OpenAI-compatible server on 127.0.0.1: retries, cache, kill and resume.

The server answers deterministically (the latent is a hash of the prompt), fails some first attempts with
429 (with Retry-After) or 500, and counts paid (200) answers per prompt, so tests can tell exactly which
chunks were paid for more than once. No traffic leaves the loopback interface.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from megatron_bolt.config.loader import load_config
from megatron_bolt.config.schema import ConfigError, SynthesizeConfig
from megatron_bolt.data import synthesize as synth

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-test-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:24]
KEY_ENV = "BOLT_TEST_TEACHER_KEY"


class FakeOpenAI:
    """A ThreadingHTTPServer speaking just enough of /v1/chat/completions.

    First attempts fail by prompt hash: 429 with Retry-After, 500, or (with ``stall_s``) an answer so late
    that the client has timed out. With ``echo_key`` the server is careless: its error bodies repeat the
    Authorization header it got, and some first attempts get a 400 (not retried) saying so.
    """

    def __init__(self, delay: float = 0.0, stall_s: float = 0.0, echo_key: bool = False):
        self.delay, self.stall_s, self.echo_key = delay, stall_s, echo_key
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()
        self.paid: Counter = Counter()
        self.statuses: Counter = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, payload = fake.answer(self.path, self.headers.get("Authorization"), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def answer(self, path: str, auth: str | None, body: dict) -> tuple[int, dict, dict]:
        if path != "/v1/chat/completions":
            return 404, {}, {"error": "no such route"}
        if auth != f"Bearer {SECRET}":
            return 401, {}, {"error": {"message": f"Incorrect API key provided: {auth}"}}
        prompt = body["messages"][-1]["content"]
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        with self.lock:
            self.attempts[digest] += 1
            first = self.attempts[digest] == 1
        echo = f" (request had Authorization: {auth})" if self.echo_key else ""
        if first and int(digest, 16) % 5 == 0:
            self.statuses[429] += 1
            return 429, {"Retry-After": "0"}, {"error": "rate limited" + echo}
        if first and int(digest, 16) % 5 == 1:
            self.statuses[500] += 1
            return 500, {}, {"error": "overloaded" + echo}
        if first and self.echo_key and int(digest, 16) % 5 == 3:
            self.statuses[400] += 1
            return 400, {}, {"error": {"message": "malformed request" + echo}}
        if first and self.stall_s and int(digest, 16) % 5 == 2:  # the client times out before this answer
            self.statuses["stalled"] += 1
            time.sleep(self.stall_s)
            return 503, {}, {"error": "too late"}
        time.sleep(self.delay)
        with self.lock:
            self.paid[digest] += 1
        return 200, {}, {"model": body["model"], "usage": {"prompt_tokens": 100, "completion_tokens": 20},
                         "choices": [{"message": {"role": "assistant", "content": f"latent {digest}"},
                                      "finish_reason": "stop"}]}

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def loopback_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never route the fake server through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def write_documents(path: Path, n_docs: int, chunks: int = 4) -> list[dict]:
    docs = [{"doc_id": 10 * i, "chunks": [f"Doc {i}, sentence {j}: {i * j} = {i} * {j}. "
                                          for j in range(chunks)]} for i in range(n_docs)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def settings(tmp_path: Path, url: str, name: str = "out", **extra) -> dict:
    return {"documents": [str(tmp_path / "docs.jsonl")], "output": str(tmp_path / f"{name}.jsonl"),
            "base_url": url, "api_key_env": KEY_ENV, "concurrency": 4, "backoff_s": 0.01, "max_retries": 3,
            "timeout_s": 10.0, **extra}


def test_prompt_follows_the_paper():
    cfg = SynthesizeConfig()
    first = json.loads(synth.request_body(cfg, synth.FIRST_PREFIX, "X1"))
    assert first["temperature"] == 0.7 and first["n"] == 1 and first["model"] == cfg.model
    system, user = first["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    # The previous chunk ("N/A" for the first) comes before the chunk whose latent thoughts are asked for.
    assert "Earlier passage:\nN/A\n\nFollowing passage:\nX1\n\n" in user["content"]
    for requirement in ("latent thoughts", "background knowledge", "step by step", "No markdown",
                        "Do not restate the earlier passage"):
        assert requirement in user["content"]
    second = json.loads(synth.request_body(cfg, "X1", "X2"))["messages"][1]["content"]
    assert "Earlier passage:\nX1\n\nFollowing passage:\nX2" in second


def test_retries_cache_and_output_in_document_order(tmp_path):
    docs = write_documents(tmp_path / "docs.jsonl", 6)
    with FakeOpenAI(stall_s=0.6) as server:
        cfg = SynthesizeConfig(**settings(tmp_path, server.url, timeout_s=0.3))
        stats = synth.synthesize(cfg)
        assert (stats.chunks, stats.completed, stats.failed) == (24, 24, 0)
        assert all(server.statuses[k] for k in (429, 500, "stalled"))  # every failure kind was retried
        assert all(n == 1 for n in server.paid.values()) and len(server.paid) == 24
        lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert [(x["doc_id"], x["chunk_index"]) for x in lines] == [(d["doc_id"], j) for d in docs
                                                                    for j in range(4)]
        assert all(set(x) == {"doc_id", "chunk_index", "latent"} for x in lines)
        assert all(x["latent"].startswith("latent ") for x in lines)
        again = synth.synthesize(cfg)  # everything cached: no request at all
        assert (again.cached, again.completed) == (24, 0) and sum(server.paid.values()) == 24


def test_torn_last_cache_line_is_cut_off_and_corruption_is_reported(tmp_path):
    write_documents(tmp_path / "docs.jsonl", 2)
    with FakeOpenAI() as server:
        cfg = SynthesizeConfig(**settings(tmp_path, server.url))
        synth.synthesize(cfg)
        cache = tmp_path / "out.jsonl.cache.jsonl"
        lines = cache.read_bytes().splitlines(keepends=True)
        cache.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # a kill in the middle of the last write
        stats = synth.synthesize(cfg)
        assert (stats.cached, stats.completed) == (7, 1)
        assert len(cache.read_bytes().splitlines()) == 8
        cache.write_bytes(b"not json\n" + cache.read_bytes())
        with pytest.raises(synth.SynthesisError, match="corrupt"):
            synth.synthesize(cfg)


def test_bad_key_stops_the_run_without_echoing_it(tmp_path, monkeypatch):
    write_documents(tmp_path / "docs.jsonl", 2)
    monkeypatch.setenv(KEY_ENV, "sk-wrong-" + SECRET[-12:])
    with FakeOpenAI() as server, pytest.raises(synth.SynthesisError) as err:
        synth.synthesize(SynthesizeConfig(**settings(tmp_path, server.url)))
    assert "HTTP 401" in str(err.value) and SECRET[-12:] not in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(synth.SynthesisError, match=f"{KEY_ENV} .* is unset"):
        synth.synthesize(SynthesizeConfig(**settings(tmp_path, "http://127.0.0.1:9/v1")))


def test_config_rules_and_local_backend_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="never the key itself"):
        load_config(None, [f"synthesize.api_key_env={SECRET}"]).validate()
    assert SECRET not in capsys.readouterr().err
    cfg = load_config(None, ["synthesize.backend=local", "synthesize.documents=[x]", "synthesize.output=y"])
    assert synth.main(cfg, Namespace()) == 2
    assert "backend=local is not available yet" in capsys.readouterr().err


def test_retry_after_parsing():
    assert synth._retry_after_seconds("3") == 3.0
    assert synth._retry_after_seconds(None) is None and synth._retry_after_seconds("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < synth._retry_after_seconds(later) <= 30


def run_cli(tmp_path: Path, config: dict, log_name: str) -> subprocess.Popen:
    """``bolt synthesize --config`` in a child process, logging at DEBUG into ``log_name`` (searched for the
    key afterwards)."""
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump({"synthesize": config}))
    cmd = [sys.executable, "-m", "megatron_bolt.cli", "--log-level", "DEBUG", "synthesize", "--config",
           str(path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(tmp_path / log_name, "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, env=env)


def test_killed_run_resumes_without_paying_twice_and_never_leaks_the_key(tmp_path):
    write_documents(tmp_path / "docs.jsonl", 20)  # 80 chunks
    with FakeOpenAI(delay=0.05) as server:
        config = settings(tmp_path, server.url)
        cache = tmp_path / "out.jsonl.cache.jsonl"
        child = run_cli(tmp_path, config, "first.log")
        deadline = time.monotonic() + 60
        while (not cache.exists() or cache.read_bytes().count(b"\n") < 20) and time.monotonic() < deadline:
            assert child.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        assert not (tmp_path / "out.jsonl").exists()
        cached_before = cache.read_bytes().count(b"\n")
        assert 20 <= cached_before < 80
        assert run_cli(tmp_path, config, "second.log").wait(timeout=60) == 0
        twice = [digest for digest, n in server.paid.items() if n > 1]
        assert len(twice) <= 2 * config["concurrency"]  # only requests in flight at the kill
        assert len(server.paid) == 80
        reference = settings(tmp_path, server.url, name="reference")
        synth.synthesize(SynthesizeConfig(**reference))  # an uninterrupted run, its own cache
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    second_log = (tmp_path / "second.log").read_text()
    assert f"{cached_before} already cached" in second_log
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_server_echoing_the_key_never_gets_it_into_output_logs_or_files(tmp_path, capsys, caplog):
    """The key is redacted from every server message the run prints or logs (at DEBUG), and written nowhere."""
    from megatron_bolt import cli

    write_documents(tmp_path / "docs.jsonl", 6)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(echo_key=True) as server:
        path = tmp_path / "synth.yaml"
        path.write_text(yaml.safe_dump({"synthesize": settings(tmp_path, server.url, max_retries=1)}))
        argv = ["--log-level", "DEBUG", "synthesize", "--config", str(path)]
        assert cli.main(argv) == 1  # the 400s are not retried: those chunks failed, no output yet
        first = capsys.readouterr()
        assert cli.main(argv) == 0  # a rerun asks again for just those, and they succeed
        second = capsys.readouterr()
        assert server.statuses[400] and server.statuses[429] and server.statuses[500]
    assert "Authorization: Bearer ***" in first.err  # the server did echo it: redacted in the failure line
    printed = first.out + first.err + second.out + second.err + caplog.text
    assert SECRET not in printed and SECRET[8:] not in printed
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "out.jsonl") in files
    for file in files:
        assert SECRET.encode() not in file.read_bytes(), file
