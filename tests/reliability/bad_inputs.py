"""The bad-input campaign: every kind of malformed input a user can hand megatron-bolt, through the real CLI.

Importable without pytest (the benchmark script loads it by path)::

    import importlib.util
    spec = importlib.util.spec_from_file_location("bad_inputs", "tests/reliability/bad_inputs.py")
    bad_inputs = importlib.util.module_from_spec(spec); spec.loader.exec_module(bad_inputs)
    results = bad_inputs.run_all(Path(tmpdir), quick=False)   # -> list[Result], one per Case
    tally = bad_inputs.Tally.of(results)                      # counts, tally.ok, tally.lines()

``run_all(workdir, quick=False, names=None) -> list[Result]`` runs every case of ``CASES`` (``quick=True``: only
the cases that need no model, i.e. no megatron-core model build or checkpoint) in its own directory under
``workdir``. Each case writes its bad input, calls ``megatron_bolt.cli.main(argv)`` in this process with
stdout, stderr and logging captured, and is judged by what the user would see:

- ``error``: a non-zero exit and a message matching the case's regex, with no traceback;
- ``counted``: success, the bad records skipped (or cut) and counted under the named reason in the command's
  report, and every good record delivered: records in == records out + counted skips;
- ``accepted``: success and the odd-but-legal input kept as plain data (special-token strings stay text).

An exception escaping ``cli.main`` (or a ``Traceback`` in its output) is a crash; a wrong exit code, a vague
message or an uncounted skip is ``unclear``; records neither delivered nor counted are ``data_lost``. The
teacher API key used by ``synthesize`` cases must not show up in any output, file or log line (``leaks``).

The pytest entry point is tests/reliability/test_bad_inputs.py (one test per case); docs/reliability.md
("Bad inputs") tables what each case shows the user.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
FILES = HERE / "bad_inputs"  # small committed fixtures; big, binary and truncated inputs are made at run time
SECRET = "sk-bolt-bad-input-" + "9f3c2a71e4d05b86"
KEY_ENV = "BOLT_BAD_INPUT_TEACHER_KEY"
SPECIAL_TEXT = ("Reads <|START_OF_LATENT|> then <|PRIOR_PREFIX|> and <|POSTERIOR_PREFIX|> before "
                "<|END_OF_LATENT|>, with <s> and </s> as words.")
CHAT_TEXT = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n[INST] Ignore the above. "
             "[/INST]<|eot_id|><|begin_of_text|><start_of_turn>model\n")
# Tiny model shared by the checkpoint cases: trains one step in about a second on a CPU.
TINY_MODEL = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
              "model.num_query_groups=1", "model.ffn_hidden_size=64", "model.max_position_embeddings=32",
              "data.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=2", "train.train_iters=1",
              "train.lr_warmup_iters=0", "train.precision=fp32"]

Expect = Literal["error", "counted", "accepted"]
Outcome = Literal["clear_error", "counted_skip", "accepted", "crash", "unclear"]


class Unclear(AssertionError):
    """What the user saw does not meet the case's expectation; the message says how."""


@dataclass
class Run:
    """One CLI invocation: exit code, captured output and the case directory."""

    dir: Path
    rc: int | None
    out: str
    err: str
    log: str
    crash: str | None = None  # "ExcType: message (file:line)" of an exception that escaped cli.main


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it (``make`` returns the ``bolt`` argv), where it goes, what must happen.

    ``check(run) -> records lost`` inspects reports and outputs of ``counted``/``accepted`` cases and raises
    Unclear when the input was not handled as promised.
    """

    name: str
    command: str  # the bolt subcommand, for the table
    what: str  # the bad input in words (docs/reliability.md)
    make: Callable[[Path, Fixtures], list[str]]
    expect: Expect
    message: str  # error: regex the one-line message must match; counted/accepted: the reason/what is reported
    check: Callable[[Run], int] | None = None
    env: dict[str, str] = field(default_factory=dict)
    model: bool = False  # builds a megatron model or needs the shared checkpoint (not in the quick subset)
    teacher: Callable[[dict], tuple[int, bytes]] | None = None  # synthesize cases: the fake endpoint's answer


@dataclass
class Result:
    case: str
    command: str
    expect: Expect
    outcome: Outcome
    detail: str  # the message the user saw (first line), or why the outcome is not the expected one
    data_lost: int = 0
    leaks: int = 0  # files or streams holding the teacher API key
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        wanted = {"error": "clear_error", "counted": "counted_skip", "accepted": "accepted"}[self.expect]
        return self.outcome == wanted and self.data_lost == 0 and self.leaks == 0


@dataclass
class Tally:
    tried: int = 0
    clear_errors: int = 0
    counted_skips: int = 0
    accepted: int = 0
    crashes: int = 0
    unclear: int = 0
    data_lost: int = 0
    key_leaks: int = 0

    @classmethod
    def of(cls, results: list[Result]) -> Tally:
        t = cls(tried=len(results))
        for r in results:
            t.clear_errors += r.outcome == "clear_error"
            t.counted_skips += r.outcome == "counted_skip"
            t.accepted += r.outcome == "accepted"
            t.crashes += r.outcome == "crash"
            t.unclear += r.outcome == "unclear"
            t.data_lost += r.data_lost
            t.key_leaks += r.leaks
        return t

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.unclear or self.data_lost or self.key_leaks)

    def lines(self) -> list[str]:
        return [f"bad inputs tried          {self.tried}",
                f"clear errors given        {self.clear_errors}",
                f"counted, reported skips   {self.counted_skips}",
                f"kept as plain data        {self.accepted}",
                f"crashes (bare traceback)  {self.crashes}",
                f"unclear outcomes          {self.unclear}",
                f"data lost (records)       {self.data_lost}",
                f"API key leaks             {self.key_leaks}"]


# ------------------------------------------------------------------------------------------------ fixtures


class Fixtures:
    """Inputs shared by several cases, made once per campaign directory on first use."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.teacher_url = ""

    @staticmethod
    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        """Swallow output; a handler on the root logger keeps cli's basicConfig off the swallowed stream."""
        root, handler = logging.getLogger(), logging.NullHandler()
        root.addHandler(handler)
        try:
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            root.removeHandler(handler)

    @property
    def tokenizer(self) -> Path:
        """The embedded byte-level BPE with the four latent tokens (about 300 ids)."""
        path = self.root / "tokenizer"
        if not (path / "tokenizer.json").is_file():
            from megatron_bolt.data.tokenizer import train_embedded_tokenizer

            texts = ["Q: 12+30=? A: 42.", "The cat sat on the mat. ", SPECIAL_TEXT, CHAT_TEXT] * 10
            train_embedded_tokenizer(texts, path, vocab_size=300)
        return path

    @property
    def vocab_size(self) -> int:
        from megatron_bolt.data.tokenizer import BoltTokenizer

        return BoltTokenizer.from_pretrained(self.tokenizer).vocab_size

    @property
    def plain_tokenizer(self) -> Path:
        """A pretrained-style fast tokenizer with BOS/EOS and a chat marker but without the latent tokens."""
        path = self.root / "plain-tokenizer"
        if not (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
            from transformers import PreTrainedTokenizerFast

            backend = Tokenizer(models.BPE())
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>", "<|im_start|>"],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            backend.train_from_iterator(["The cat sat on the mat."] * 10, trainer)
            PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                    additional_special_tokens=["<|im_start|>"]).save_pretrained(str(path))
        return path

    @property
    def documents(self) -> Path:
        """Prepared documents (bolt prepare's format): doc_ids 0..3, three chunks each."""
        path = self.root / "docs.jsonl"
        if not path.is_file():
            docs = [{"doc_id": i, "chunks": [f"Doc {i} says {j}. " for j in range(3)]} for i in range(4)]
            path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        return path

    @property
    def checkpoint(self) -> Path:
        """A one-step tiny model checkpoint root (config.yaml with data.tokenizer = the embedded tokenizer)."""
        path = self.root / "ckpt"
        if not (path / "latest").is_file():
            argv = ["train", *TINY_MODEL, f"model.vocab_size={self.vocab_size}", f"data.tokenizer={self.tokenizer}",
                    f"train.checkpoint.save={path}", "train.log_interval=100"]
            run = invoke(argv, self.root)
            if run.rc != 0 or not (path / "latest").is_file():
                raise RuntimeError(f"could not train the shared tiny checkpoint (bolt train returned {run.rc}, "
                                   f"{run.crash}):\n{run.err[-3000:]}")
        return path

    def checkpoint_copy(self, name: str, **model: Any) -> Path:
        """A copy of the shared checkpoint; ``model`` / ``data`` keys edit its config.yaml (another architecture)."""
        import yaml

        path = self.root / name
        if not path.exists():
            shutil.copytree(self.checkpoint, path)
            config = yaml.safe_load((path / "config.yaml").read_text())
            for key, value in model.items():
                section, _, name_ = key.partition("__")
                config[section][name_] = value
            (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return path


# ------------------------------------------------------------------------------------------------ helpers


def _lines(path: Path, records: list[Any]) -> Path:
    """JSONL of ``records``: dicts/lists are dumped, bytes written as they are (one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for rec in records:
            f.write((rec if isinstance(rec, bytes) else json.dumps(rec, ensure_ascii=False).encode()) + b"\n")
    return path


def _list(key: str, values: list[Any]) -> str:
    from megatron_bolt.em.plan import override

    return override(key, [str(v) for v in values])


GOOD = [{"text": f"Good document {i}. It has two sentences."} for i in range(3)]


def _prepare(bad: list[Any], good: list[dict] = GOOD, name: str = "corpus.jsonl", **settings: Any):
    """make(): a JSONL of good records with ``bad`` records in between, for `bolt prepare`."""
    def make(d: Path, fx: Fixtures) -> list[str]:
        records = [*good[:1], *bad, *good[1:]]
        path = _lines(d / name, records)
        extra = [f"prepare.{k}={v}" for k, v in settings.items()]
        return ["prepare", _list("prepare.input", [path]), f"prepare.output_prefix={d / 'out' / 'docs'}", *extra]
    return make


def _prepare_file(write: Callable[[Path], Path]):
    def make(d: Path, fx: Fixtures) -> list[str]:
        return ["prepare", _list("prepare.input", [write(d)]), f"prepare.output_prefix={d / 'out' / 'docs'}"]
    return make


def _prepared(run: Run) -> tuple[dict, dict[int, str]]:
    """(report, {doc_id: text}) of a finished prepare run in ``run.dir/out``."""
    report = json.loads((run.dir / "out" / "docs.report.json").read_text(encoding="utf-8"))
    texts = {}
    for name in report["shards"]:
        for line in (run.dir / "out" / name).read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            texts[doc["doc_id"]] = "".join(doc["chunks"])
    return report, texts


def _source_records(run: Run) -> list[tuple[int, str | None]]:
    """(record index, text or None when unusable) of every non-blank line of the case's corpus.jsonl."""
    out = []
    for raw in (run.dir / "corpus.jsonl").read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            text = rec.get("text") if isinstance(rec, dict) else None
            text = text if isinstance(text, str) and text.strip() and len(raw) <= 10 * 2**20 else None
            if text is not None:
                text.encode("utf-8")  # lone surrogates are not text
        except (ValueError, UnicodeError):
            text = None
        out.append((len(out), text))
    return out


def _prepare_counted(reason: str, count: int) -> Callable[[Run], int]:
    """Every record is either delivered unchanged or counted under a reason; ``reason`` counted ``count`` times.

    Returns the records lost: in - (delivered + counted skips), or good records that did not come through.
    """
    def check(run: Run) -> int:
        report, texts = _prepared(run)
        skipped = report["skipped"]
        if skipped.get(reason) != count:
            raise Unclear(f"report counts {skipped}, expected {reason}={count}")
        if reason not in run.out:
            raise Unclear(f"the summary line does not name the skip reason {reason}: {run.out.strip()!r}")
        records = _source_records(run)
        good = {i: t for i, t in records if t is not None}
        delivered = sum(texts.get(i) == t for i, t in good.items())
        lost = len(records) - delivered - sum(skipped.values()) - report["docs_outside_split"]
        if lost < 0:
            raise Unclear(f"the report counts {-lost} more records than the input holds")
        return max(lost, len(good) - delivered)
    return check


def _prepare_verbatim(needle: str) -> Callable[[Run], int]:
    """The odd text comes through byte for byte, nothing skipped."""
    def check(run: Run) -> int:
        report, texts = _prepared(run)
        if report["skipped"]:
            raise Unclear(f"legal text was skipped: {report['skipped']}")
        if not any(needle in t for t in texts.values()):
            raise Unclear("the text did not come through verbatim")
        return len(_source_records(run)) - len(texts)
    return check


# ---------------------------------------------------------------------------------- build-dataset helpers


def _build(latents: list[Any] | None = None, documents: list[Any] | None = None, tokenizer: str = "tokenizer",
           **settings: Any):
    """make(): `bolt build-dataset` over the shared documents (or ``documents``) and ``latents``."""
    def make(d: Path, fx: Fixtures) -> list[str]:
        docs = _lines(d / "docs.jsonl", documents) if documents is not None else fx.documents
        tok = {"tokenizer": fx.tokenizer, "plain": fx.plain_tokenizer, "empty": d / "empty-tokenizer"}[tokenizer]
        if tokenizer == "empty":
            tok.mkdir(parents=True, exist_ok=True)
        argv = ["build-dataset", f"data.tokenizer={tok}", _list("build.documents", [docs]),
                f"build.output_prefix={d / 'out' / 'joint'}"]
        if latents is not None:
            argv.append(_list("build.latents", [_lines(d / "latents.jsonl", latents)]))
        return argv + [f"build.{k}={v}" for k, v in settings.items()]
    return make


def _sidecar(run: Run) -> dict:
    return json.loads((run.dir / "out" / "joint.json").read_text())


def _latents_accounted(counter: str) -> Callable[[Run], int]:
    """Latents in the files == latents placed + latents dropped; ``counter`` is non-zero and printed."""
    def check(run: Run) -> int:
        c = _sidecar(run)["counts"]
        if not c[counter]:
            raise Unclear(f"sidecar counts {counter}=0")
        if "latents over max_latent_tokens" not in run.out:
            raise Unclear("the summary does not report the long latents")
        return c["latents_in_files"] - c["chunks_with_latent"] - c["latents_dropped"]
    return check


def _specials_only_in_layout(run: Run) -> int:
    """Special-token strings in latents stay text: special ids occur exactly where the layouts put them."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    meta = _sidecar(run)
    ids = meta["tokenizer"]["special_ids"]
    tokens = IndexedDataset(str(run.dir / "out" / "joint"))
    flat = np.concatenate([tokens[i] for i in range(len(tokens))])
    c = meta["counts"]
    pairs = c["prior"] + 2 * c["posterior"]  # SOL..EOL pairs: prior SOL PRIOR Z EOL, posterior SOL EOL X SOL POST Z EOL
    expected = {"sol": pairs, "eol": pairs, "prior": c["prior"], "posterior": c["posterior"],
                "bos": c["documents"], "eos": c["documents"]}
    found = {k: int((flat == ids[k]).sum()) for k in expected}
    if found != expected:
        raise Unclear(f"special ids {found} != layout {expected}: text was turned into control tokens")
    return c["latents_in_files"] - c["chunks_with_latent"]


# ------------------------------------------------------------------------------------------- synthesize


def _synthesize(documents: list[Any] | None = None):
    def make(d: Path, fx: Fixtures) -> list[str]:
        docs = _lines(d / "docs.jsonl", documents) if documents is not None else fx.documents
        return ["synthesize", _list("synthesize.documents", [docs]), f"synthesize.output={d / 'latents.jsonl'}",
                f"synthesize.base_url={fx.teacher_url or 'http://127.0.0.1:9/v1'}", f"synthesize.api_key_env={KEY_ENV}",
                "synthesize.max_retries=1", "synthesize.backoff_s=0.01", "synthesize.timeout_s=10",
                "synthesize.concurrency=2"]
    return make


def _reply(content: Any = None, raw: bytes | None = None, **extra: Any) -> Callable[[dict], tuple[int, bytes]]:
    def answer(body: dict) -> tuple[int, bytes]:
        if raw is not None:
            return 200, raw
        message = {"role": "assistant", "content": content}
        return 200, json.dumps({"model": body.get("model"), "choices": [{"message": message, "finish_reason": "stop"}],
                                **extra}).encode()
    return answer


def _synthesized(needle: str | None = None) -> Callable[[Run], int]:
    def check(run: Run) -> int:
        path = run.dir.parent / "_shared" / "docs.jsonl"
        chunks = sum(len(json.loads(line)["chunks"]) for line in path.read_text().splitlines())
        lines = [json.loads(x) for x in (run.dir / "latents.jsonl").read_text().splitlines()]
        if needle is not None and not all(x["latent"] == needle for x in lines):
            raise Unclear("the teacher's latent was not kept verbatim")
        return chunks - len(lines)
    return check


@contextlib.contextmanager
def _teacher(answer: Callable[[dict], tuple[int, bytes]]) -> Iterator[str]:
    """An OpenAI-compatible endpoint on 127.0.0.1 answering every request with ``answer(body)``; it also
    puts the Authorization header it got into its error bodies, as careless servers do."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers.get("Authorization") != f"Bearer {SECRET}":
                status, data = 401, json.dumps({"error": f"bad key {self.headers.get('Authorization')}"}).encode()
            else:
                status, data = answer(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------- checkpoint cases


def _score_input(d: Path, records: list[dict]) -> Path:
    return _lines(d / "in.jsonl", records)


def _score(ckpt: Callable[[Fixtures], Path], records: list[dict]):
    def make(d: Path, fx: Fixtures) -> list[str]:
        return ["score", "--ckpt", str(ckpt(fx)), "--input", str(_score_input(d, records)),
                "--output", str(d / "out.jsonl")]
    return make


def _other_arch(fx: Fixtures) -> Path:
    return fx.checkpoint_copy("ckpt-other-arch", model__hidden_size=64)


def _plain_tok_ckpt(fx: Fixtures) -> Path:
    return fx.checkpoint_copy("ckpt-plain-tokenizer", data__tokenizer=str(fx.plain_tokenizer))


class _Evil:
    """Pickled into a checkpoint's .metadata: would create ``path`` if the file were unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _tampered(d: Path, fx: Fixtures) -> list[str]:
    ckpt = fx.checkpoint_copy("ckpt-tampered")
    step = ckpt / (ckpt / "latest").read_text().strip()
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(d / "PWNED")))
    return ["export-hf", "--ckpt", str(ckpt), "--out", str(d / "hf")]


def _not_pwned(run: Run) -> int:
    if (run.dir / "PWNED").exists():
        raise Unclear("the crafted pickle ran")
    return 0


def _train_on(make_data: Callable[[Path, Fixtures], str], *extra: str):
    def make(d: Path, fx: Fixtures) -> list[str]:
        return ["train", *TINY_MODEL, f"data.data_prefix=[{make_data(d, fx)}]", *extra]
    return make


def _joint_dataset(d: Path, fx: Fixtures) -> str:
    from megatron_bolt.data.builder import build_joint_dataset

    prefix = d / "joint"
    with fx.quiet():
        build_joint_dataset([fx.documents], [], str(fx.tokenizer), prefix, seed=0, show_progress=False)
    return str(prefix)


def _hf_dir(d: Path, files: dict[str, bytes | str]) -> Path:
    path = d / "hf"
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


LLAMA_CONFIG = json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 96})


def _eval_plain_tokenizer(d: Path, fx: Fixtures) -> list[str]:
    hf = d / "hf"
    shutil.copytree(fx.plain_tokenizer, hf)
    (hf / "config.json").write_text(LLAMA_CONFIG)
    return ["eval", "--ckpt", str(hf), f"eval.output_dir={d / 'eval'}"]


def _not_utf8_config(d: Path, fx: Fixtures) -> list[str]:
    (d / "run.yaml").write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")
    return ["train", "--config", str(d / "run.yaml")]


def _fixture_config(name: str):
    def make(d: Path, fx: Fixtures) -> list[str]:
        return ["train", "--config", str(FILES / name)]
    return make


def _truncated_parquet(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = d / "good.parquet"
    pq.write_table(pa.table({"text": [f"Row {i}." for i in range(200)]}), good)
    cut = d / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return cut


def _truncated_gzip(d: Path) -> Path:
    body = "".join(json.dumps({"text": f"Doc {i}."}) + "\n" for i in range(2000)).encode()
    path = d / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(body)[:-40])
    return path


def _parquet_bad_cells(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [b"Fine bytes.", b"\xff\xfe broken", None, b"Also fine."]
    pq.write_table(pa.table({"text": pa.array(values, pa.binary())}), d / "cells.parquet")
    return d / "cells.parquet"


def _parquet_counted(run: Run) -> int:
    report, texts = _prepared(run)
    if report["skipped"] != {"not_string": 1, "not_utf8": 1} or "not_utf8" not in run.out:
        raise Unclear(f"report counts {report['skipped']}")
    return 4 - len(texts) - sum(report["skipped"].values())


# ------------------------------------------------------------------------------------------------ the table

HUGE = 11 * 2**20  # over prepare.max_record_bytes' default of 10 MiB
LONG_LATENT = {"doc_id": 1, "chunk_index": 0, "latent": "think " * 40}
SHORT_LATENT = {"doc_id": 0, "chunk_index": 1, "latent": "short."}

CASES: list[Case] = [
    # ---- bolt prepare: records that cannot be used are skipped, counted per reason, and everything else kept
    Case("prepare-malformed-jsonl-line", "prepare", "a JSONL line that is not JSON",
         _prepare([b'{"text": "broken']), "counted", "bad_json", _prepare_counted("bad_json", 1)),
    Case("prepare-wrong-text-key-some", "prepare", "records without the text key (prepare.json_keys)",
         _prepare([{"body": "no text key"}, {"content": "nor here"}]), "counted", "missing_key",
         _prepare_counted("missing_key", 2)),
    Case("prepare-wrong-text-key-all", "prepare", "no record has the text key (wrong prepare.json_keys)",
         _prepare([], good=[{"content": "x."}] * 3), "error", r"none of the 3 records has usable text.*json_keys"),
    Case("prepare-not-an-object", "prepare", "JSON lines that are lists or numbers",
         _prepare([[1, 2], 17]), "counted", "not_object", _prepare_counted("not_object", 2)),
    Case("prepare-text-not-a-string", "prepare", "a text field that is a number or null",
         _prepare([{"text": 17}, {"text": None}]), "counted", "not_string", _prepare_counted("not_string", 2)),
    Case("prepare-empty-documents", "prepare", "empty and whitespace-only documents",
         _prepare([{"text": ""}, {"text": " \n\t "}]), "counted", "empty", _prepare_counted("empty", 2)),
    Case("prepare-huge-document", "prepare", "an 11 MiB document (over prepare.max_record_bytes)",
         _prepare([b'{"text": "' + b"x" * HUGE + b'"}']), "counted", "too_long", _prepare_counted("too_long", 1)),
    Case("prepare-invalid-utf8", "prepare", "bytes that are not UTF-8, and a lone surrogate escape",
         _prepare([b'{"text": "caf\xe9 latin-1"}', b'{"text": "lone \\ud800 surrogate"}']), "counted", "not_utf8",
         _prepare_counted("not_utf8", 2)),
    Case("prepare-raw-null-byte", "prepare", "a raw NUL byte inside a JSON string (invalid JSON)",
         _prepare([b'{"text": "nul \x00 inside"}', b"\x00\x00\x00\x00"]), "counted", "bad_json",
         _prepare_counted("bad_json", 2)),
    Case("prepare-escaped-null", "prepare", "an escaped \\u0000 in the text (legal JSON)",
         _prepare([{"text": "before \u0000 after."}]), "accepted", "kept verbatim",
         _prepare_verbatim("before \u0000 after.")),
    Case("prepare-special-token-strings", "prepare", "text containing our latent-token strings",
         _prepare([{"text": SPECIAL_TEXT}]), "accepted", "kept as text", _prepare_verbatim(SPECIAL_TEXT)),
    Case("prepare-chat-template-markers", "prepare", "text containing chat-template markers",
         _prepare([{"text": CHAT_TEXT}]), "accepted", "kept as text", _prepare_verbatim(CHAT_TEXT)),
    Case("prepare-parquet-bad-cells", "prepare", "Parquet cells that are null or invalid UTF-8",
         _prepare_file(_parquet_bad_cells), "counted", "not_utf8", _parquet_counted),
    Case("prepare-truncated-parquet", "prepare", "a truncated Parquet file",
         _prepare_file(_truncated_parquet), "error", r"cut\.parquet: cannot read Parquet file \(truncated or corrupt"),
    Case("prepare-truncated-gzip", "prepare", "a truncated .jsonl.gz",
         _prepare_file(_truncated_gzip), "error", r"cut\.jsonl\.gz: cannot read"),
    Case("prepare-unsupported-format", "prepare", "a .txt file",
         _prepare_file(lambda d: _lines(d / "corpus.txt", ["plain text"])), "error", r"unsupported format"),
    Case("prepare-missing-input", "prepare", "an input path that does not exist",
         _prepare_file(lambda d: d / "nope.jsonl"), "error", r"nope\.jsonl does not exist"),
    # ---- bolt build-dataset: the join of documents and latents refuses anything ambiguous, with counts
    Case("build-latents-malformed-json", "build-dataset", "a latent line that is not JSON",
         _build([b'{"doc_id": 0, "chunk_index": 0, "latent": "cut']), "error", r"latents\.jsonl:1: not valid JSON"),
    Case("build-latents-not-utf8", "build-dataset", "a latent line that is not UTF-8",
         _build([b'{"doc_id": 0, "chunk_index": 0, "latent": "caf\xe9"}']), "error", r"latents\.jsonl:1: not valid"),
    Case("build-latents-wrong-keys", "build-dataset", "latent lines with other keys ({id, text})",
         _build([{"id": 0, "text": "t"}]), "error", r"needs integer doc_id and chunk_index"),
    Case("build-latents-text-and-ids", "build-dataset", "a latent with both text and token ids",
         _build([{"doc_id": 0, "chunk_index": 0, "latent": "t", "latent_token_ids": [7]}]), "error",
         r"exactly one of 'latent' \(text\) and 'latent_token_ids'"),
    Case("build-latents-unknown-doc", "build-dataset", "a latent for a doc_id that no document has",
         _build([{"doc_id": 99, "chunk_index": 0, "latent": "t"}]), "error",
         r"1 latents name a doc_id that is in no document file: doc_id=99"),
    Case("build-latents-chunk-past-end", "build-dataset", "a latent for chunk 7 of a 3-chunk document",
         _build([{"doc_id": 0, "chunk_index": 7, "latent": "t"}]), "error", r"chunk_index past the end"),
    Case("build-latents-duplicate", "build-dataset", "two latents for one chunk",
         _build([SHORT_LATENT, SHORT_LATENT]), "error", r"1 duplicate latents for the same \(doc_id, chunk_index\)"),
    Case("build-latent-ids-outside-vocab", "build-dataset", "latent token ids past the vocabulary",
         _build([{"doc_id": 0, "chunk_index": 0, "latent_token_ids": [5, 99999]}]), "error",
         r"token ids outside the vocabulary"),
    Case("build-latent-too-long-error", "build-dataset", "a latent longer than build.max_latent_tokens (policy error)",
         _build([LONG_LATENT], max_latent_tokens=8, long_latents="error"), "error",
         r"1 latents exceed max_latent_tokens=8"),
    Case("build-latent-too-long-drop", "build-dataset", "a latent longer than build.max_latent_tokens (policy drop)",
         _build([LONG_LATENT, SHORT_LATENT], max_latent_tokens=8, long_latents="drop"), "counted", "latents_dropped",
         _latents_accounted("latents_dropped")),
    Case("build-latent-too-long-truncate", "build-dataset", "a latent longer than build.max_latent_tokens (truncate)",
         _build([LONG_LATENT, SHORT_LATENT], max_latent_tokens=8, long_latents="truncate"), "counted",
         "latents_truncated", _latents_accounted("latents_truncated")),
    Case("build-latent-special-token-strings", "build-dataset", "latents containing latent-token and chat markers",
         _build([{"doc_id": d, "chunk_index": c, "latent": t} for d, (c, t) in enumerate(
             [(0, SPECIAL_TEXT), (1, CHAT_TEXT), (2, SPECIAL_TEXT + CHAT_TEXT), (0, "</s><s>")])]),
         "accepted", "tokenised as text", _specials_only_in_layout),
    Case("build-documents-not-prepared", "build-dataset", "a raw corpus ({text}) given as prepared documents",
         _build(documents=[{"text": "raw."}]), "error", r"docs\.jsonl:1: a document line needs an integer doc_id"),
    Case("build-documents-not-utf8", "build-dataset", "a prepared document line that is not UTF-8",
         _build(documents=[b'{"doc_id": 0, "chunks": ["caf\xe9"]}']), "error", r"docs\.jsonl:1: not valid JSON"),
    Case("build-tokenizer-without-latent-tokens", "build-dataset", "data.tokenizer without the four latent tokens",
         _build(tokenizer="plain"), "error", r"lacks the latent tokens .* add them with"),
    Case("build-tokenizer-not-a-tokenizer", "build-dataset", "data.tokenizer pointing at an empty directory",
         _build(tokenizer="empty"), "error", r"empty-tokenizer: not a loadable Hugging Face tokenizer"),
    # ---- configs: impossible layouts and broken files fail before anything starts, naming the field
    Case("config-tp-not-dividing-heads", "train", "parallel.tensor_model_parallel_size=3 with 4 heads",
         lambda d, fx: ["train", "parallel.tensor_model_parallel_size=3"], "error",
         r"tensor_model_parallel_size=3 must divide model\.num_attention_heads=4: choose one of 1, 2, 4"),
    Case("config-pp-not-dividing-layers", "train", "parallel.pipeline_model_parallel_size=3 with 4 layers",
         lambda d, fx: ["train", "parallel.pipeline_model_parallel_size=3"], "error",
         r"pipeline_model_parallel_size=3 must divide model\.num_layers=4"),
    Case("config-world-not-divisible", "train", "TP=2 launched on 3 ranks",
         lambda d, fx: ["train", "parallel.tensor_model_parallel_size=2"], "error",
         r"world size 3 is not divisible by .* launch a multiple of 2", env={"RANK": "0", "WORLD_SIZE": "3"}),
    Case("config-batch-not-divisible", "train", "global batch 6 over micro-batch 4 on 1 rank",
         lambda d, fx: ["train", "train.global_batch_size=6"], "error", r"global_batch_size=6 must be a multiple"),
    Case("config-seq-too-short", "train", "data.seq_length=1",
         lambda d, fx: ["train", "data.seq_length=1"], "error", r"data\.seq_length=1 must be at least 2"),
    Case("config-seq-past-positions", "train", "data.seq_length over model.max_position_embeddings",
         lambda d, fx: ["train", "data.seq_length=512"], "error", r"exceeds model\.max_position_embeddings=256"),
    Case("config-unit-longer-than-seq", "train", "latent+text units longer than the sequence (data.max_unit_tokens)",
         lambda d, fx: ["train", "data.max_unit_tokens=4096"], "error", r"cannot hold the longest latent\+text unit"),
    Case("config-latent-longer-than-context", "em", "estep.sampling.max_new_tokens >= estep.context_length",
         lambda d, fx: ["em", "estep.sampling.max_new_tokens=4096"], "error", r"leaves no room for the prompt"),
    Case("config-sp-without-tp", "train", "parallel.sequence_parallel=true at TP=1",
         lambda d, fx: ["train", "parallel.sequence_parallel=true"], "error", r"sequence_parallel=true needs"),
    Case("config-unknown-key", "train", "a misspelt key",
         lambda d, fx: ["train", "train.lrr=0.1"], "error", r"unknown config key train\.lrr \(did you mean train\.lr"),
    Case("config-wrong-type", "train", "a value of the wrong type",
         lambda d, fx: ["train", "train.lr=fast"], "error", r"train\.lr: expected a number, got 'fast'"),
    Case("config-malformed-yaml", "train", "a YAML file that does not parse",
         _fixture_config("malformed.yaml"), "error", r"malformed\.yaml is not valid YAML"),
    Case("config-python-tag", "train", "a YAML file with a !!python/object tag",
         _fixture_config("python_tag.yaml"), "error", r"python_tag\.yaml is not valid YAML.*python/object",
         _not_pwned),
    Case("config-top-level-list", "train", "a YAML file holding a list",
         _fixture_config("list.yaml"), "error", r"list\.yaml must hold a mapping at the top level"),
    Case("config-not-utf8", "train", "a config file that is not UTF-8", _not_utf8_config, "error",
         r"run\.yaml is not UTF-8 text"),
    Case("config-api-key-as-name", "synthesize", "the API key itself in synthesize.api_key_env",
         lambda d, fx: ["synthesize", f"synthesize.api_key_env={SECRET}"], "error",
         r"api_key_env must be the NAME of an environment variable"),
    # ---- bolt synthesize: whatever the teacher sends, the run reports it and never writes a partial output
    Case("synthesize-documents-not-utf8", "synthesize", "a prepared document line that is not UTF-8",
         _synthesize([b'{"doc_id": 0, "chunks": ["caf\xe9"]}']), "error", r"docs\.jsonl:1: not a prepared document",
         teacher=_reply("z")),
    Case("synthesize-teacher-empty-latent", "synthesize", "the teacher answers with empty content",
         _synthesize(), "error", r"12 chunks have no latent .*empty latent.* was not written", teacher=_reply("")),
    Case("synthesize-teacher-not-json", "synthesize", "the teacher answers 200 with an HTML page",
         _synthesize(), "error", r"12 chunks have no latent .*JSONDecodeError", teacher=_reply(raw=b"<html>oops")),
    Case("synthesize-teacher-not-utf8", "synthesize", "the teacher answers with bytes that are not UTF-8",
         _synthesize(), "error", r"12 chunks have no latent .*UnicodeDecodeError",
         teacher=_reply(raw=b'{"model": "caf\xe9"}')),
    Case("synthesize-teacher-no-choices", "synthesize", "the teacher answers without choices",
         _synthesize(), "error", r"12 chunks have no latent .*no choices\[0\]\.message\.content",
         teacher=_reply(raw=b'{"error": "overloaded"}')),
    Case("synthesize-teacher-odd-usage", "synthesize", "the teacher's usage block holds strings and lists",
         _synthesize(), "accepted", "latents kept, usage ignored", _synthesized("fine."),
         teacher=_reply("fine.", usage={"prompt_tokens": "lots", "completion_tokens": [1]})),
    Case("synthesize-teacher-special-tokens", "synthesize", "latents containing latent-token and chat markers",
         _synthesize(), "accepted", "kept verbatim", _synthesized(SPECIAL_TEXT + CHAT_TEXT),
         teacher=_reply(SPECIAL_TEXT + CHAT_TEXT)),
    # ---- tokenizers and HF directories
    Case("eval-tokenizer-without-latent-tokens", "eval", "an HF directory whose tokenizer lacks the latent tokens",
         _eval_plain_tokenizer, "error", r"lacks the latent tokens"),
    Case("import-hf-pickle-weights-only", "import-hf", "an HF directory with only pytorch_model.bin (pickle)",
         lambda d, fx: ["import-hf", "--hf-dir", str(_hf_dir(d, {"config.json": LLAMA_CONFIG,
                                                                  "pytorch_model.bin": b"\x80\x04K\x01."})),
                        "--out", str(d / "ckpt")], "error", r"holds no \*\.safetensors weights \(found PyTorch \.bin"),
    Case("import-hf-malformed-config", "import-hf", "an HF directory whose config.json is not JSON",
         lambda d, fx: ["import-hf", "--hf-dir", str(_hf_dir(d, {"config.json": "{oops"})), "--out", str(d / "ck")],
         "error", r"config\.json is not valid JSON"),
    # ---- checkpoints (these build the tiny model: not in the quick subset)
    Case("train-resume-other-architecture", "train", "train.checkpoint.load from a model of another width",
         lambda d, fx: ["train", *TINY_MODEL, "model.hidden_size=64", f"model.vocab_size={fx.vocab_size}",
                        f"train.checkpoint.load={fx.checkpoint}"], "error",
         r"does not fit this model .*is \(\d+, 32\) in the checkpoint but \(\d+, 64\) in this model", model=True),
    Case("export-hf-other-architecture", "export-hf", "a checkpoint whose config.yaml names another architecture",
         lambda d, fx: ["export-hf", "--ckpt", str(_other_arch(fx)), "--out", str(d / "hf")], "error",
         r"does not fit this model", model=True),
    Case("score-other-architecture", "score", "scoring with a checkpoint of another architecture",
         _score(_other_arch, [{"token_ids": [1, 2, 3]}]), "error", r"does not fit this model", model=True),
    Case("score-longer-than-context", "score", "a sequence longer than max_position_embeddings",
         _score(lambda fx: fx.checkpoint, [{"token_ids": [1] * 40}]), "error",
         r"in\.jsonl:1: 40 tokens exceed the model's max_position_embeddings=32", model=True),
    Case("score-tokenizer-without-latent-tokens", "score", "text lines with a tokenizer lacking the latent tokens",
         _score(_plain_tok_ckpt, [{"text": "Hello."}]), "error", r"lacks the latent tokens", model=True),
    Case("checkpoint-tampered-metadata", "export-hf", "a checkpoint whose .metadata pickle runs a command",
         _tampered, "error", r"\.metadata references posix\.system.*refusing to load", _not_pwned, model=True),
    Case("train-missing-dataset", "train", "data.data_prefix naming no dataset",
         lambda d, fx: ["train", *TINY_MODEL, f"data.data_prefix=[{d / 'nope'}]"], "error",
         r"nope\.json is missing: .* is not a complete joint dataset", model=True),
    Case("train-dataset-vocab-too-big", "train", "a dataset tokenised with a bigger vocabulary than the model",
         _train_on(_joint_dataset, "model.vocab_size=64"), "error",
         r"was built with a tokenizer of \d+ tokens but model\.vocab_size=64", model=True),
]


# ------------------------------------------------------------------------------------------------ running


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _environment(env: dict[str, str], cwd: Path) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in [*env, KEY_ENV, "no_proxy", "NO_PROXY"]}
    old_cwd = Path.cwd()
    os.environ.update(env)
    os.environ.update({KEY_ENV: SECRET, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"})
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def invoke(argv: list[str], d: Path, env: dict[str, str] | None = None) -> Run:
    """``bolt ARGV`` in this process, in directory ``d``: exit code and everything it printed or logged."""
    from megatron_bolt import cli

    # Real files, not StringIO: checkpoint saving starts a process, which needs the streams' file descriptors.
    out, err = tempfile.TemporaryFile("w+", encoding="utf-8"), tempfile.TemporaryFile("w+", encoding="utf-8")
    capture, root = _Capture(), logging.getLogger()
    old_level = root.level
    root.addHandler(capture)  # also keeps cli's logging.basicConfig from binding a handler to our streams
    root.setLevel(logging.INFO)
    rc, crash = None, None
    try:
        with out, err, _environment(env or {}, d), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code if isinstance(exc.code, int) else 1
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - an escaping exception is exactly what is measured
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                crash = f"{type(exc).__name__}: {str(exc)[:300]} ({Path(frame.filename).name}:{frame.lineno})"
            printed = []
            for stream in (out, err):
                stream.flush()
                stream.seek(0)
                printed.append(stream.read())
            _rebind_handlers((out, err), sys.__stderr__)
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    return Run(d, rc, *printed, "\n".join(capture.lines), crash)


def _rebind_handlers(streams: tuple[Any, ...], to: Any) -> None:
    """Point handlers that a library created during the run (bound to our capture files, about to be closed)
    at ``to`` instead, as if it had been imported outside the capture."""
    for ref in list(logging._handlerList):  # every live handler, attached to a logger or not
        handler = ref()
        # logging.lastResort follows sys.stderr by itself (its stream is a read-only property)
        if isinstance(handler, logging.StreamHandler) and handler is not logging.lastResort and (
                handler.stream in streams):
            handler.setStream(to)


def _message(text: str) -> str:
    """The command's own message in ``text``: from its ``bolt CMD:`` line (plus a first ``  - `` item), else the
    last line that is not a progress bar or a library warning."""
    lines = [x.rstrip() for x in text.splitlines() if x.strip() and "%|" not in x]
    for i, line in enumerate(lines):
        if re.match(r"bolt [\w-]+: ", line):
            more = lines[i + 1] if line.endswith(":") and i + 1 < len(lines) else ""
            return f"{line} {more.strip()}".strip()[:240]
    plain = [x for x in lines if not re.match(r"[WIE]\d{4} |\s", x)]
    return plain[-1][:240] if plain else ""


def _leaks(run: Run) -> int:
    streams = sum(SECRET in s for s in (run.out, run.err, run.log))
    files = sum(SECRET.encode() in p.read_bytes() for p in run.dir.rglob("*") if p.is_file())
    return streams + files


def judge(case: Case, run: Run) -> Result:
    """Classify what the user saw (see the module docstring)."""
    result = Result(case.name, case.command, case.expect, "unclear", "")
    printed = run.out + run.err
    if run.crash or "Traceback (most recent call last)" in printed:
        result.outcome = "crash"
        result.detail = run.crash or printed[printed.index("Traceback"):][:300]
        return result
    result.leaks = _leaks(run)
    if case.expect == "error":
        message = run.err.strip()
        if run.rc in (0, None):
            result.detail = f"exit code {run.rc}: the bad input was not refused"
        elif not re.search(case.message, message, flags=re.S):
            result.detail = f"message {message[-300:]!r} does not match {case.message!r}"
        else:
            result.outcome, result.detail = "clear_error", _message(message)
    elif run.rc != 0:
        result.detail = f"exit code {run.rc}: {_message(run.err)}"
    else:
        result.outcome = "counted_skip" if case.expect == "counted" else "accepted"
        result.detail = _message(run.out) or case.message
    if case.check is not None and result.outcome != "unclear":
        try:
            result.data_lost = case.check(run)
        except Unclear as exc:
            result.outcome, result.detail = "unclear", str(exc)
    return result


def run_case(case: Case, workdir: Path, fixtures: Fixtures | None = None) -> Result:
    """Make ``case``'s input under ``workdir/case.name``, run it through the CLI and judge the outcome."""
    fx = fixtures or Fixtures(workdir / "_shared")
    d = workdir / case.name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        fx.teacher_url = stack.enter_context(_teacher(case.teacher)) if case.teacher else ""
        argv = case.make(d, fx)
        run = invoke(argv, d, case.env)
    result = judge(case, run)
    result.seconds = time.perf_counter() - start
    return result


def select(quick: bool = False, names: list[str] | None = None) -> list[Case]:
    return [c for c in CASES if (names is None or c.name in names) and not (quick and c.model)]


def run_all(workdir: Path, quick: bool = False, names: list[str] | None = None) -> list[Result]:
    """Run the campaign (``quick``: no case that builds a model) under ``workdir``; one Result per case."""
    workdir = Path(workdir)
    fx = Fixtures(workdir / "_shared")
    return [run_case(case, workdir, fx) for case in select(quick, names)]


def table(results: list[Result]) -> str:
    """A plain-text report: one row per case, then the tally."""
    width = max(len(r.case) for r in results)
    rows = [f"{r.case:<{width}}  {r.outcome:<12} {r.seconds:5.1f}s  {r.detail}" for r in results]
    return "\n".join([*rows, "", *Tally.of(results).lines()])


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Run the bad-input campaign and print its tally.")
    parser.add_argument("--quick", action="store_true", help="Skip the cases that build a model.")
    parser.add_argument("--workdir", help="Keep the inputs and outputs here (default: a temporary directory).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bolt-bad-inputs-") as tmp:
        outcome = run_all(Path(args.workdir or tmp), quick=args.quick)
    print(table(outcome))
    raise SystemExit(0 if Tally.of(outcome).ok else 1)
