"""``bolt synthesize``: warm-start latents from a teacher behind an OpenAI-compatible chat-completions API.

    export OPENAI_API_KEY=...          # the config names the variable (synthesize.api_key_env), never the key
    bolt synthesize synthesize.documents=[runs/data/warm-*.jsonl] synthesize.output=runs/latents/warm.jsonl

One request per chunk with the paper's prompt (the previous chunk as prefix, "N/A" for the first; the
chunk as suffix; temperature 0.7). Any OpenAI-compatible server works (OpenAI, vLLM's ``vllm serve``,
...): set ``synthesize.base_url`` and ``synthesize.model``.

Money is spent once per chunk: every response is appended to a JSONL cache keyed by a hash of the request
(model, messages, sampling parameters) the moment it arrives, so a crash, a kill or a rerun only repeats
the requests that were in flight (chunks with identical prompts share one request and one latent). A torn
last line left by a kill is cut off on the next start. The output (``{"doc_id", "chunk_index", "latent"}``
per line, document order) is written atomically, and only once every chunk has a latent; a run with
failures exits non-zero and a rerun retries just those.

The API key is read from the environment at start and only ever placed in the Authorization header: it is
not logged, not written to the cache or output, and is redacted from any server message that is logged.
"""

from __future__ import annotations

import argparse
import email.utils
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_bolt.config.schema import BoltConfig, SynthesizeConfig
from megatron_bolt.data.jsonl import expand_paths, iter_line_batches
from megatron_bolt.utils.atomic import atomic_open

log = logging.getLogger(__name__)

# Our wording of the warm-start prompt described in the BoLT paper (see shared notes, bolt-method.md):
# the teacher sees the previous chunk and the current one and writes the thinking that produced the latter.
SYSTEM_PROMPT = (
    "You are an expert reader of web documents who reconstructs, in full, the reasoning and knowledge "
    "that an author relied on while writing."
)
USER_TEMPLATE = (
    "Below are two consecutive passages of one web document: an earlier passage and the passage that "
    "follows it. Write the latent thoughts an author would have had while writing the following passage, "
    "given the earlier one: the background knowledge the passage takes for granted and the reasoning "
    "behind each of its claims, with every derivation or calculation worked step by step.\n\n"
    "Earlier passage:\n{prefix}\n\nFollowing passage:\n{suffix}\n\n"
    "Write only the thoughts, in short, plain, declarative sentences. No markdown, no headings, no "
    "commentary about the task, and no mention of the passages themselves. Do not restate the earlier "
    "passage. Make every sentence carry information: concrete facts, explicit logical steps, and exact "
    "mathematical derivations where they apply."
)
FIRST_PREFIX = "N/A"
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, no access, wrong URL or model: stop everything


class SynthesisError(RuntimeError):
    """The run cannot go on (bad credentials, endpoint or cache); the message says what to fix."""


class ChunkFailed(RuntimeError):
    """One chunk got no usable latent; the run continues and a rerun retries it."""


@dataclass(frozen=True)
class Job:
    doc_id: int
    chunk_index: int
    body: bytes  # the exact request body: its hash is the cache key
    key: str


def request_body(cfg: SynthesizeConfig, prefix: str, suffix: str) -> bytes:
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_TEMPLATE.format(prefix=prefix, suffix=suffix)}]
    body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens, "n": 1}
    return json.dumps(body, sort_keys=True, ensure_ascii=False).encode()


def iter_jobs(cfg: SynthesizeConfig, paths: list[Path]) -> Iterator[Job]:
    """One job per chunk, documents in input order, up to ``limit_documents`` documents."""
    documents = 0
    for path, first, lines in iter_line_batches(paths, 1024):
        for i, line in enumerate(lines):
            if not line:
                continue
            if cfg.limit_documents is not None and documents >= cfg.limit_documents:
                return
            try:
                doc = json.loads(line)
                doc_id, chunks = doc["doc_id"], doc["chunks"]
            except (ValueError, KeyError, TypeError):  # ValueError: bad JSON or bytes that are not UTF-8
                doc_id, chunks = None, None
            if not isinstance(doc_id, int) or not isinstance(chunks, list) or not all(
                    isinstance(c, str) for c in chunks):
                raise SynthesisError(f"{path}:{first + i}: not a prepared document line {{doc_id, chunks}}")
            documents += 1
            for c, suffix in enumerate(chunks):
                body = request_body(cfg, chunks[c - 1] if c else FIRST_PREFIX, suffix)
                yield Job(doc_id, c, body, hashlib.sha256(body).hexdigest())


class ResponseCache:
    """Append-only JSONL of responses keyed by request hash; holds only key -> byte offset in memory.

    Opened with an exclusive lock (two runs on one cache would pay twice). A last line without its newline
    is what a kill mid-write leaves: it is cut off. Any other unreadable line is corruption and an error.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+b")  # lives as long as the cache; close() ends it
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise SynthesisError(f"{path} is in use by another bolt synthesize run") from None
        self.offsets: dict[str, int] = {}
        self.added: set[str] = set()  # keys written by this run
        self._load()

    def _load(self) -> None:
        self._file.seek(0)
        offset = 0
        for number, line in enumerate(self._file, start=1):
            if not line.endswith(b"\n"):
                log.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted run",
                            self.path, len(line))
                self._file.truncate(offset)
                break
            try:
                self.offsets[json.loads(line)["key"]] = offset
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SynthesisError(f"{self.path}:{number} is corrupt; move the cache aside to rebuild it "
                                     "(responses in it would be paid again)") from None
            offset += len(line)
        self._file.seek(0, os.SEEK_END)

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def get(self, key: str) -> dict[str, Any]:
        self._file.seek(self.offsets[key])
        record = json.loads(self._file.readline())
        self._file.seek(0, os.SEEK_END)
        return record

    def put(self, record: dict[str, Any]) -> None:
        """Append one response; flushed at once so that a kill loses at most the line being written."""
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        self.offsets[record["key"]] = offset
        self.added.add(record["key"])

    def close(self) -> None:
        self._file.close()


_KEY_LIKE = re.compile(r"(sk-|Bearer\s+)[A-Za-z0-9_\-*.]{4,}")


class ChatClient:
    """POST /chat/completions with retries: full-jitter exponential backoff, Retry-After honoured.

    A 429 with Retry-After pauses every thread, not just the one that got it; ``stop()`` makes waiting
    threads give up at once (used when the run is aborted).
    """

    def __init__(self, cfg: SynthesizeConfig, api_key: str | None):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._secret = api_key
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._lock = threading.Lock()
        self._not_before = 0.0
        self._random = random.Random()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return _KEY_LIKE.sub(r"\1***", text)

    def _post(self, body: bytes) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            return json.loads(response.read())

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self._random.uniform(0, min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**attempt))
        wait_s = _retry_after_seconds(retry_after)
        if wait_s is not None:
            delay = max(delay, wait_s)
            with self._lock:
                self._not_before = max(self._not_before, time.monotonic() + wait_s)
        return delay

    def complete(self, body: bytes) -> dict[str, Any]:
        """The parsed response, or ChunkFailed / SynthesisError once retrying cannot help."""
        attempt = 0
        while True:
            with self._lock:
                pause = self._not_before - time.monotonic()
            if self._stop.wait(max(pause, 0.0)):
                raise ChunkFailed("the run was stopped")
            try:
                return self._post(body)
            except urllib.error.HTTPError as exc:
                detail = self.redact(_error_body(exc))
                if exc.code in FATAL_STATUS:
                    raise SynthesisError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
                if exc.code not in RETRY_STATUS:
                    raise ChunkFailed(f"HTTP {exc.code}: {detail}") from None
                problem, retry_after = f"HTTP {exc.code}", exc.headers.get("Retry-After")
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
                    ValueError) as exc:  # ValueError: a body that is not JSON (or not UTF-8)
                problem, retry_after = self.redact(f"{type(exc).__name__}: {exc}"), None
            if attempt == self.cfg.max_retries:
                raise ChunkFailed(f"{problem} after {attempt + 1} attempts")
            delay = self._delay(attempt, retry_after)
            log.debug("%s; retry %d in %.2fs", problem, attempt + 1, delay)
            if self._stop.wait(delay):
                raise ChunkFailed("the run was stopped")
            attempt += 1


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_body(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode(errors="replace")[:300]
    except OSError:
        return ""


def _record(job: Job, response: dict[str, Any]) -> dict[str, Any]:
    """The cache line for one response; anything without a usable latent is a ChunkFailed."""
    try:
        choice = response["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ChunkFailed("the response has no choices[0].message.content") from None
    if not isinstance(content, str) or not content.strip():
        raise ChunkFailed(f"empty latent (finish_reason={choice.get('finish_reason')})")
    usage = response.get("usage")
    usage = usage if isinstance(usage, dict) else {}

    def tokens(name: str) -> int:  # a server's odd usage block costs the estimate, never the latent
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    return {"key": job.key, "doc_id": job.doc_id, "chunk_index": job.chunk_index, "latent": content,
            "finish_reason": choice.get("finish_reason"), "model": response.get("model"),
            "usage": {"prompt_tokens": tokens("prompt_tokens"), "completion_tokens": tokens("completion_tokens")}}


def _fetch(client: ChatClient, job: Job) -> dict[str, Any]:
    return _record(job, client.complete(job.body))


@dataclass
class RunStats:
    """What a run found and did; the token counts and cost cover this run's requests only."""

    chunks: int = 0
    cached: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: list[str] = field(default_factory=list)

    def usd(self, cfg: SynthesizeConfig) -> float:
        spent = self.prompt_tokens * cfg.input_usd_per_mtok + self.completion_tokens * cfg.output_usd_per_mtok
        return spent / 1e6

    def postfix(self, cfg: SynthesizeConfig) -> dict[str, str]:
        todo = self.chunks - self.cached
        projected = self.usd(cfg) / self.completed * todo if self.completed else 0.0
        return {"tok_in": f"{self.prompt_tokens:,}", "tok_out": f"{self.completion_tokens:,}",
                "usd": f"{self.usd(cfg):.2f}", "usd_total_est": f"{projected:.2f}",
                "failed": str(self.failed)}


def _drain(pending: dict[Future, Job], cache: ResponseCache, stats: RunStats, bar: Any,
           cfg: SynthesizeConfig) -> None:
    """Wait for at least one request; cache each result the moment it is known."""
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        job = pending.pop(future)
        try:
            record = future.result()
        except ChunkFailed as exc:
            stats.failed += 1
            stats.failures.append(f"doc_id={job.doc_id} chunk_index={job.chunk_index}: {exc}")
            log.warning("doc_id=%d chunk_index=%d failed: %s", job.doc_id, job.chunk_index, exc)
        else:
            cache.put(record)
            stats.completed += 1
            stats.prompt_tokens += record["usage"]["prompt_tokens"]
            stats.completion_tokens += record["usage"]["completion_tokens"]
        bar.update(1)
        bar.set_postfix(stats.postfix(cfg), refresh=False)


def _fetch_missing(cfg: SynthesizeConfig, client: ChatClient, cache: ResponseCache, jobs: Iterator[Job],
                   stats: RunStats) -> None:
    """Request every chunk not in the cache, ``concurrency`` at a time, in a bounded window."""
    from tqdm import tqdm

    pending: dict[Future, Job] = {}
    with (ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="synthesize") as pool,
          tqdm(total=stats.chunks - stats.cached, unit="chunk", desc="synthesize") as bar):
        try:
            for job in jobs:
                if job.key in cache.added or any(p.key == job.key for p in pending.values()):
                    bar.update(1)  # the same request (identical prompt) was answered or is in flight
                    continue
                if job.key in cache:
                    continue  # cached before this run (not counted in the bar's total)
                pending[pool.submit(_fetch, client, job)] = job
                while len(pending) >= 2 * cfg.concurrency:
                    _drain(pending, cache, stats, bar, cfg)
            while pending:
                _drain(pending, cache, stats, bar, cfg)
        except BaseException:
            client.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _write_output(cfg: SynthesizeConfig, paths: list[Path], cache: ResponseCache, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output, "wb") as f:
        for job in iter_jobs(cfg, paths):
            latent = cache.get(job.key)["latent"]
            line = {"doc_id": job.doc_id, "chunk_index": job.chunk_index, "latent": latent}
            f.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")


def _api_key(cfg: SynthesizeConfig) -> str | None:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise SynthesisError(f"the environment variable {cfg.api_key_env} (synthesize.api_key_env) is unset")
    return key


def synthesize(cfg: SynthesizeConfig) -> RunStats:
    """Fill the cache for every chunk of ``cfg.documents``, then write ``cfg.output`` if all succeeded."""
    client = ChatClient(cfg, _api_key(cfg))
    paths = expand_paths(cfg.documents, "synthesize.documents")
    output = Path(cfg.output)
    cache = ResponseCache(Path(cfg.cache) if cfg.cache else output.with_name(output.name + ".cache.jsonl"))
    stats = RunStats()
    try:
        for job in iter_jobs(cfg, paths):
            stats.chunks += 1
            stats.cached += job.key in cache
        log.info("%d chunks, %d already cached in %s", stats.chunks, stats.cached, cache.path)
        _fetch_missing(cfg, client, cache, iter_jobs(cfg, paths), stats)
        if stats.failed:
            output.unlink(missing_ok=True)  # an output file always means: complete for this config
        else:
            _write_output(cfg, paths, cache, output)
    finally:
        cache.close()
    return stats


def main(cfg: BoltConfig, args: argparse.Namespace) -> int:
    s = cfg.synthesize
    if s.backend == "local":
        print("bolt synthesize: synthesize.backend=local is not available yet (it will generate through "
              "megatron_bolt's generation interface). Meanwhile serve the teacher with any OpenAI-compatible "
              "server (e.g. `vllm serve MODEL`) and use backend=openai with synthesize.base_url.",
              file=sys.stderr)
        return 2
    required = (("synthesize.documents", s.documents), ("synthesize.output", s.output))
    missing = [name for name, value in required if not value]
    if missing:
        print(f"bolt synthesize: set {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        stats = synthesize(s)
    except (SynthesisError, FileNotFoundError) as exc:
        print(f"bolt synthesize: {exc}", file=sys.stderr)
        return 1
    print(f"{stats.chunks} chunks: {stats.cached} from the cache, {stats.completed} requested now, "
          f"{stats.failed} failed; {stats.prompt_tokens:,} prompt + {stats.completion_tokens:,} completion "
          f"tokens, about ${stats.usd(s):.2f}")
    if stats.failed:
        print(f"bolt synthesize: {stats.failed} chunks have no latent ({stats.failures[0]} ...); "
              f"{s.output} was not written. Rerun to retry only those.", file=sys.stderr)
        return 1
    return 0
