"""The crash campaign over the whole pipeline: every stage killed at seeded moments, rerun, compared.

    from tests.reliability.campaign import QUICK, Campaign
    c = Campaign(Path("/tmp/campaign"), QUICK)
    c.fault("prepare", seed=0)      # reference run (once), a SIGKILLed run, the same command again, the diff
    c.errors("train")               # read-only and disk-full: a clear error, the previous state still loadable
    tally(c.faults, c.error_results)

Stages chain as in a real run: ``prepare`` chunks a generated embedded corpus; ``build-dataset`` joins the
reference prepare output with the teacher latents; ``train`` trains on the reference dataset; ``estep`` samples
(2 shards), scores and resamples with the reference checkpoint; ``em`` runs a small EM loop of its own (warm start
plus one iteration). Each stage's reference is an uninterrupted run of the same command into another directory.

Kill points (per seed, cycling through the stage's kinds; every parameter drawn from ``random.Random(stage/seed)``):

- ``time``: uniform over the reference's working time, counted from its first output file (interpreter start-up
  excluded: it is most of a short command's wall time and the least interesting place to die);
- a progress point: a number of finished prepare shards, a size of the dataset being written, a checkpoint save
  in flight (``.step_N.partial`` present, the run frozen and checked before the kill), a number of sampled batches,
  an EM stage in progress.

Expected result everywhere: identical artifacts (bytes, or tensors bit for bit for checkpoints) and 0 records lost.
Used by tests/reliability/test_faults.py (a fast subset) and benchmarks/reliability.py (the whole campaign).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.faults import (
    Diff,
    Limits,
    Outcome,
    Trigger,
    after_marker,
    bolt,
    clear_error,
    compare_bytes,
    compare_checkpoint,
    compare_json,
    compare_keys,
    digests,
    idx_sequences,
    jsonl,
    leftovers,
    read_only,
    run,
    start,
    supervise,
    when,
)


@dataclass(frozen=True)
class Sizes:
    docs: int  # embedded corpus for prepare / build-dataset
    docs_per_shard: int
    prepare_workers: tuple[int, ...]  # workers of the faulted prepare runs, by seed (the reference uses 1)
    train_iters: int
    save_interval: int
    estep_docs: int
    em_docs: int
    em_train_iters: int
    em_eval: int


QUICK = Sizes(docs=2000, docs_per_shard=50, prepare_workers=(1,), train_iters=8, save_interval=2, estep_docs=8,
              em_docs=160, em_train_iters=6, em_eval=8)
FULL = Sizes(docs=6000, docs_per_shard=100, prepare_workers=(1, 2), train_iters=12, save_interval=3, estep_docs=12,
             em_docs=240, em_train_iters=9, em_eval=10)

STAGES = ("prepare", "build-dataset", "train", "estep", "em")
ROOT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
NEWLINE = b"\n"


@dataclass
class Reference:
    out: Path
    outcome: Outcome

    @property
    def window(self) -> float:
        """CPU seconds the run used from its first output file to its end (its own work)."""
        return max(self.outcome.cpu - (self.outcome.cpu_at_marker or 0.0), 0.05)


@dataclass
class FaultResult:
    stage: str
    seed: int
    trigger: str
    killed: bool
    killed_at: float | None  # seconds after the start
    state: str  # what the killed run had written
    leftovers: int  # hidden temporary files / partial directories it left
    resumed: bool  # the same command, rerun, finished
    reused: bool | None  # ... and reused the killed run's finished work (None: the stage restarts by design)
    identical: bool
    lost: int
    duplicated: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ErrorResult:
    stage: str
    case: str  # read-only | disk-full
    clear: bool
    message: str
    intact: bool  # the previous state is unchanged and loadable
    finished: bool | None = None  # the same command without the fault then ran to the end (None: not tried)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ stages


class Stage:
    name = ""
    command = ""
    kinds: tuple[str, ...] = ("time",)
    standalone: tuple[str, ...] = ()  # kill points that need no reference run (its size, its duration)
    timeout = 1800.0  # seconds per command: generous, a shared 2-core machine can be 10x slower than idle

    def __init__(self, campaign: Campaign):
        self.c = campaign

    def argv(self, out: Path, *extra: str) -> list[str]:
        raise NotImplementedError

    def marker(self, out: Path) -> bool:
        """The run has started writing outputs."""
        raise NotImplementedError

    def extra(self, seed: int) -> list[str]:
        """Overrides of a faulted run (never changing its output)."""
        return []

    def trigger(self, kind: str, out: Path, rng: random.Random, ref: Reference | None) -> tuple[str, Trigger]:
        fraction = rng.uniform(0.02, 0.8)  # not later: a loaded machine may run faster than the reference
        return (f"time: {fraction:.0%} of the reference's {ref.window:.1f} CPU seconds of work",
                after_marker(lambda: self.marker(out), fraction * ref.window))

    def state(self, out: Path) -> str:
        return ""

    def compare(self, ref: Path, got: Path) -> Diff:
        raise NotImplementedError

    def reused(self, text: str) -> bool | None:
        return None


def _count(pattern: str) -> Callable[[Path], int]:
    return lambda out: len(list(out.glob(pattern))) if out.is_dir() else 0


class Prepare(Stage):
    name = command = "prepare"
    kinds = ("time", "shards")
    standalone = ("shards",)

    def argv(self, out: Path, *extra: str) -> list[str]:
        s = self.c.sizes
        return bolt("prepare", f"prepare.input=[{self.c.corpus / 'corpus.jsonl'}]", f"prepare.output_prefix={out}/docs",
                    f"prepare.docs_per_shard={s.docs_per_shard}", "prepare.chunk_lambda=0", *extra)

    def marker(self, out: Path) -> bool:
        return (out / "docs.params.json").is_file()

    def extra(self, seed: int) -> list[str]:
        workers = self.c.sizes.prepare_workers
        return [f"prepare.workers={workers[seed % len(workers)]}"]

    def shards(self) -> int:
        return -(-self.c.sizes.docs // self.c.sizes.docs_per_shard)

    def trigger(self, kind, out, rng, ref):
        if kind == "shards":
            k = rng.randint(1, self.shards() - 1)
            return f"shards: {k} of {self.shards()} written", when(lambda: _count("docs-*.jsonl")(out) >= k)
        return super().trigger(kind, out, rng, ref)

    def state(self, out):
        return f"{_count('docs-*.jsonl')(out)} of {self.shards()} shards"

    def doc_ids(self, out: Path) -> list[int]:
        return [doc["doc_id"] for shard in sorted(out.glob("docs-*.jsonl")) for doc in jsonl(shard)]

    def compare(self, ref, got):
        names = [p.name for p in sorted(ref.glob("docs-*.jsonl"))] + ["docs.report.json", "docs.params.json"]
        d = compare_bytes(ref, got, names)
        extra = sorted({p.name for p in got.glob("docs-*.jsonl")} - set(names))
        if extra:
            d.differ(f"unexpected shards {extra[:3]}")
        return d.add(compare_keys(self.doc_ids(ref), self.doc_ids(got), "documents"))

    def reused(self, text):
        m = re.search(r"\((\d+) resumed\)", text)
        return bool(m and int(m.group(1)))


class BuildDataset(Stage):
    name = command = "build-dataset"
    kinds = ("bytes", "time")
    FILES = ("joint.bin", "joint.idx", "joint_kinds.bin", "joint_kinds.idx", "joint.json")

    def argv(self, out, *extra):
        c = self.c
        return bolt("build-dataset", f"data.tokenizer={c.corpus / 'tokenizer'}",
                    f"build.documents=[{c.reference('prepare').out}]", f"build.latents=[{c.corpus / 'latents.jsonl'}]",
                    f"build.output_prefix={out}/joint", "build.docs_per_task=64", *extra)

    def marker(self, out):
        return out.is_dir() and any(p.name.startswith(".joint.partial") or p.name == "joint.json"
                                    for p in out.iterdir())

    def trigger(self, kind, out, rng, ref):
        if kind == "bytes":
            total = (ref.out / "joint.bin").stat().st_size
            fraction = rng.uniform(0.05, 0.95)
            target = int(fraction * total)
            partial = out / ".joint.partial.bin"

            def written() -> bool:
                try:
                    return partial.stat().st_size >= target
                except FileNotFoundError:
                    return False

            return f"bytes: {fraction:.0%} of joint.bin written", when(written)
        return super().trigger(kind, out, rng, ref)

    def state(self, out):
        partial = out / ".joint.partial.bin"
        return f"{partial.stat().st_size} bytes of joint.bin" if partial.is_file() else "no partial dataset"

    def compare(self, ref, got):
        d = compare_bytes(ref, got, self.FILES)
        n_ref = idx_sequences(ref / "joint.idx")
        n_got = idx_sequences(got / "joint.idx") if (got / "joint.idx").is_file() else 0
        return d.add(compare_keys(range(n_ref), range(n_got), "documents"))


def _metrics(root: Path) -> dict[int, tuple]:
    """(loss, grad_norm, lr) per step from SAVE/metrics.jsonl, the last record of a redone step winning (as
    megatron_bolt.train.loop.read_metrics reads it, without importing megatron-core here)."""
    steps = {}
    for line in (root / "metrics.jsonl").read_text().splitlines() if (root / "metrics.jsonl").is_file() else []:
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        steps[m["step"]] = (m.get("loss"), m.get("grad_norm"), m.get("lr"))
    return steps


def _latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None


class Train(Stage):
    name = command = "train"
    kinds = ("save", "time")
    standalone = ("save",)

    def argv(self, out, *extra):
        return bolt("train", "--config", self.c.train_config(), f"train.checkpoint.save={out}", *extra)

    def marker(self, out):
        path = out / "metrics.jsonl"
        return path.is_file() and path.stat().st_size > 0

    def trigger(self, kind, out, rng, ref):
        s = self.c.sizes
        if kind == "save":
            # a later save: the rerun must resume from the published one before it and drop the half-written one
            step = rng.choice(range(2 * s.save_interval, s.train_iters + 1, s.save_interval))
            partial = out / f".step_{step:08d}.partial"
            return (f"save: while step {step} is being saved",
                    when(lambda: partial.is_dir() and not (out / f"step_{step:08d}").exists()))
        return super().trigger(kind, out, rng, ref)

    def state(self, out):
        partials = sorted(p.name for p in out.glob(".step_*.partial"))
        return f"latest {_latest(out)}" + (f", half-written {', '.join(partials)}" if partials else "")

    def compare(self, ref, got):
        final = _latest(ref)
        d = Diff()
        if _latest(got) != final:
            d.differ(f"latest names {_latest(got)}, the reference {final}")
        d.add(compare_checkpoint(ref / final, got / final))
        if list(got.glob(".step_*.partial")):
            d.differ("a .partial checkpoint directory is left")
        want, have = _metrics(ref), _metrics(got)
        d.add(compare_keys(list(want), list(have), "metrics steps"))
        changed = [k for k in want if k in have and want[k] != have[k]]
        if changed:
            d.differ(f"metrics of steps {changed[:5]} differ")
        return d

    def reused(self, text):
        return "resuming from" in text


ESTEP = ("estep.num_shards=2", "estep.sampling.num_samples=2", "estep.sampling.max_new_tokens=24",
         "estep.sampling.batch_size=3", "estep.context_length=256", 'estep.chunk_pattern="^A:"',
         "train.micro_batch_size=4")


class EStep(Stage):
    name = command = "estep"
    kinds = ("batches", "time")
    FILES = ("samples/shard-00000.jsonl", "samples/shard-00001.jsonl", "scores/shard-00000.jsonl",
             "scores/shard-00001.jsonl", "latents.jsonl", "diagnostics.jsonl", "params.json")

    def argv(self, out, *extra):
        c = self.c
        ckpt, hf, docs = c.estep_inputs()
        return bolt("estep", "--ckpt", ckpt, "--hf-dir", hf, f"estep.documents=[{docs}]", f"estep.output_dir={out}",
                    *ESTEP, *extra)

    def marker(self, out):
        return (out / "samples").is_dir()

    def trigger(self, kind, out, rng, ref):
        if kind == "batches":
            shard = rng.randint(0, 1)
            total = len(jsonl(ref.out / f"samples/shard-{shard:05d}.jsonl"))
            k = rng.randint(1, max(total - 1, 1))
            partial = out / f"samples/shard-{shard:05d}.jsonl.partial"

            def sampled() -> bool:
                try:
                    return partial.read_bytes().count(NEWLINE) >= k
                except FileNotFoundError:
                    return False

            return f"batches: shard {shard} has {k} of {total} chunks sampled", when(sampled)
        return super().trigger(kind, out, rng, ref)

    def state(self, out):
        samples = out / "samples"
        if not samples.is_dir():
            return "nothing sampled"
        parts = [f"{p.name}: {p.read_bytes().count(NEWLINE)} chunks" for p in sorted(samples.glob("*.partial"))]
        return "; ".join(parts + [f"finished {[p.name for p in sorted(samples.glob('*.jsonl'))]}"])

    @staticmethod
    def keys(out: Path, pattern: str) -> list[tuple[int, int]]:
        return [(r["doc_id"], r["chunk_index"]) for p in sorted(out.glob(pattern)) for r in jsonl(p)]

    def compare(self, ref, got):
        d = compare_bytes(ref, got, self.FILES)
        d.add(compare_json(ref / "estep.json", got / "estep.json", _without("sampling")))
        d.add(compare_keys(self.keys(ref, "samples/shard-*.jsonl"), self.keys(got, "samples/shard-*.jsonl"),
                           "sampled chunks"))
        return d.add(compare_keys(self.keys(ref, "latents.jsonl"), self.keys(got, "latents.jsonl"), "latents"))

    def reused(self, text):
        return "resumes after" in text or None


def _without(*keys: str) -> Callable[[Any], Any]:
    def drop(obj: Any) -> Any:
        return {k: v for k, v in obj.items() if k not in keys}

    return drop


def _em_report(report: dict) -> dict:
    """report.json without wall times, the config hash (it holds the run directory) and sampling speed."""
    report = json.loads(json.dumps(report))
    report.pop("config_hash", None)
    report.pop("run", None)
    for it in report["iterations"]:
        it.pop("seconds", None)
        if it.get("estep"):
            it["estep"].pop("sampling", None)
    return report


class EM(Stage):
    name = command = "em"
    kinds = ("time", "sample", "train")
    standalone = ("sample", "train")
    timeout = 3600.0

    def argv(self, out, *extra):
        return bolt("em", "--config", self.c.em_config(), f"em.run_dir={out}", *extra)

    def marker(self, out):
        return (out / "config.yaml").is_file()

    def trigger(self, kind, out, rng, ref):
        if kind == "sample":
            return ("sample: iteration 1 is sampling latents",
                    when(lambda: any((out / "iter1/estep/samples").glob("*.partial"))))
        if kind == "train":
            i = rng.randint(0, 1)
            k = rng.randint(1, self.c.sizes.em_train_iters - 1)
            metrics = out / f"iter{i}/checkpoints/metrics.jsonl"

            def trained() -> bool:
                try:
                    return metrics.read_bytes().count(NEWLINE) >= k
                except FileNotFoundError:
                    return False

            return f"train: iteration {i} has trained {k} steps", when(trained)
        return super().trigger(kind, out, rng, ref)

    def state(self, out):
        done = sorted(str(p.relative_to(out / "manifests"))[:-5] for p in (out / "manifests").rglob("*.json")) \
            if (out / "manifests").is_dir() else []
        return f"{len(done)} stages finished" + (f" (last {done[-1]})" if done else "")

    def compare(self, ref, got):
        d = compare_json(ref / "report.json", got / "report.json", _em_report)
        d.add(compare_bytes(ref, got, ["iter1/estep/latents.jsonl"]))
        d.add(compare_keys(EStep.keys(ref, "iter1/estep/latents.jsonl"), EStep.keys(got, "iter1/estep/latents.jsonl"),
                           "latents"))
        for i in (0, 1):
            root = f"iter{i}/checkpoints"
            d.add(compare_checkpoint(ref / root / _latest(ref / root), got / root / _latest(ref / root)))
            for name in ("joint.bin", "joint.idx"):
                d.add(compare_bytes(ref, got, [f"iter{i}/data/{name}"]))
        return d

    def reused(self, text):
        return len(re.findall(r"em: stage ", text)) < len(re.findall(r"em: stage ", self.c.reference("em")
                                                                      .outcome.text()))


# ------------------------------------------------------------------------------------------------ campaign


class Campaign:
    """Shared inputs, one reference run per stage (made on first use), and the results so far."""

    def __init__(self, root: Path, sizes: Sizes = QUICK, say: Callable[[str], None] = print, overlap: bool = False):
        self.root, self.sizes, self.say, self.overlap = Path(root), sizes, say, overlap
        self.root.mkdir(parents=True, exist_ok=True)
        self.stages: dict[str, Stage] = {s.name: s(self) for s in (Prepare, BuildDataset, Train, EStep, EM)}
        self.refs: dict[str, Reference] = {}
        self.faults: list[FaultResult] = []
        self.error_results: list[ErrorResult] = []
        self._corpus: Path | None = None

    # ---- shared inputs

    @property
    def corpus(self) -> Path:
        if self._corpus is None:
            from megatron_bolt.data.embedded import generate_embedded

            path = self.root / "corpus"
            if not (path / "manifest.json").is_file():
                generate_embedded(path, self.sizes.docs, seed=0, num_eval=0)
            self._corpus = path
        return self._corpus

    def _tokenizer_vocab(self, tokenizer: Path) -> int:
        from megatron_bolt.data.tokenizer import BoltTokenizer

        return BoltTokenizer.from_pretrained(tokenizer).vocab_size

    def train_config(self) -> Path:
        path = self.root / "train.yaml"
        if not path.is_file():
            from megatron_bolt.config.loader import dump_yaml, load_config

            s, tok = self.sizes, self.corpus / "tokenizer"
            cfg = load_config(ROOT_CONFIG, [
                f"data.tokenizer={tok}", f"data.data_prefix=[{self.reference('build-dataset').out / 'joint'}]",
                "data.seq_length=128", "model.max_position_embeddings=256",
                f"model.vocab_size={self._tokenizer_vocab(tok)}", "train.micro_batch_size=4",
                "train.global_batch_size=4", f"train.train_iters={s.train_iters}", "train.lr_warmup_iters=2",
                f"train.checkpoint.save_interval={s.save_interval}", "train.checkpoint.keep_last=2",
                "train.log_interval=1"])
            path.write_text(dump_yaml(cfg))
        return path

    def estep_inputs(self) -> tuple[Path, Path, Path]:
        """(reference checkpoint, its HF export, the documents the E-step labels)."""
        ckpt, hf, docs = self.reference("train").out, self.root / "hf", self.root / "bootstrap" / "docs.jsonl"
        if not (hf / "config.json").is_file():
            done = run(bolt("export-hf", "--ckpt", ckpt, "--out", hf), self.root / "logs" / "export-hf.log")
            if done.rc != 0:
                raise RuntimeError(f"bolt export-hf failed:\n{done.tail()}")
        if not docs.is_file():
            first = sorted(self.reference("prepare").out.glob("docs-*.jsonl"))[0]
            docs.parent.mkdir(parents=True, exist_ok=True)
            docs.write_text("".join(first.read_text().splitlines(keepends=True)[:self.sizes.estep_docs]))
        return ckpt, hf, docs

    def em_config(self) -> Path:
        path = self.root / "em.yaml"
        if path.is_file():
            return path
        from megatron_bolt.config.loader import dump_yaml, load_config
        from megatron_bolt.config.schema import PrepareConfig
        from megatron_bolt.data.embedded import generate_embedded
        from megatron_bolt.data.prepare import read_prepared, run_prepare
        from megatron_bolt.recipes import tiny_cpu_quickstart

        s, root = self.sizes, self.root / "em-inputs"
        corpus = generate_embedded(root / "corpus", s.em_docs, seed=0, num_eval=s.em_eval)
        for name, split in {"warm": "0:1:4", "bootstrap": "1:2:8"}.items():
            run_prepare(PrepareConfig(input=[str(corpus.corpus)], output_prefix=str(root / name / "docs"), split=split,
                                      chunk_lambda=0.0), progress=False)
        warm = {doc["doc_id"] for doc in read_prepared(root / "warm" / "docs")}
        latents = [line for line in corpus.latents.read_text().splitlines(keepends=True)
                   if json.loads(line)["doc_id"] in warm]
        (root / "warm_latents.jsonl").write_text("".join(latents))
        cfg = load_config(None, [
            "model.hidden_size=64", "model.ffn_hidden_size=176",
            f"model.vocab_size={self._tokenizer_vocab(corpus.tokenizer)}",
            f"data.tokenizer={corpus.tokenizer}", f"train.train_iters={s.em_train_iters}", "train.lr_warmup_iters=2",
            "train.global_batch_size=4", "train.micro_batch_size=4", "train.checkpoint.save_interval=3",
            "estep.sampling.max_new_tokens=24", f"eval.limit={s.em_eval}", "eval.max_new_tokens=24",
            f"eval.data_path={corpus.eval}", "em.iterations=1", f"em.warm_documents=[{root / 'warm'}]",
            f"em.warm_latents=[{root / 'warm_latents.jsonl'}]", f"em.bootstrap_documents=[{root / 'bootstrap'}]",
        ], base=tiny_cpu_quickstart())
        path.write_text(dump_yaml(cfg))
        return path

    # ---- runs

    def reference(self, name: str) -> Reference:
        """The uninterrupted run of ``name`` (kept on disk: a later campaign in the same root reuses it)."""
        if name not in self.refs:
            self._end_reference(name, self._start_reference(name))
        return self.refs[name]

    def _start_reference(self, name: str) -> tuple | None:
        stage, out = self.stages[name], self.root / name / "reference"
        argv = stage.argv(out)  # may build the inputs (and earlier references) first
        saved = self.root / name / "reference.json"
        if saved.is_file() and json.loads(saved.read_text())["argv"] == argv:
            done = json.loads(saved.read_text())
            self.refs[name] = Reference(out, Outcome(**{**done, "log": Path(done["log"])}))
            return None
        shutil.rmtree(out, ignore_errors=True)
        self.say(f"[{name}] reference run")
        log = self.root / "logs" / f"{name}-reference.log"
        return (*start(argv, log), argv, log)

    def _end_reference(self, name: str, pending: tuple | None) -> None:
        if pending is None:
            return
        stage, out = self.stages[name], self.root / name / "reference"
        done = supervise(*pending, marker=lambda: stage.marker(out), timeout=stage.timeout)
        if done.rc != 0:
            raise RuntimeError(f"the reference {name} run failed ({done.rc}):\n{done.tail()}")
        self.say(f"[{name}] reference: {done.seconds:.1f}s, first output after {done.marker_at or 0:.1f}s; "
                 f"{done.cpu - (done.cpu_at_marker or 0):.1f} CPU seconds of work after it")
        self.refs[name] = Reference(out, done)
        (self.root / name / "reference.json").write_text(json.dumps({**asdict(done), "log": str(done.log)}, indent=1))

    def fault(self, name: str, seed: int) -> FaultResult:
        """Kill a run of ``name`` at the seed's point, rerun the same command, compare with the reference.

        With ``overlap`` and a kill point that does not depend on the reference (a progress point), a missing
        reference runs at the same time as the killed run (two processes: start-up is most of their time)."""
        stage = self.stages[name]
        kind = stage.kinds[seed % len(stage.kinds)]
        pending = None
        if name not in self.refs and not (self.overlap and kind in stage.standalone):
            self.reference(name)
        elif name not in self.refs:
            pending = self._start_reference(name)
        rng = random.Random(f"{name}/{seed}")
        out = self.root / name / f"seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        what, trigger = stage.trigger(kind, out, rng, self.refs.get(name))
        argv = stage.argv(out, *stage.extra(seed))
        logs = self.root / "logs"
        first = run(argv, logs / f"{name}-seed{seed}-killed.log", trigger=trigger, timeout=stage.timeout)
        self._end_reference(name, pending)
        ref = self.refs[name]
        state, left = stage.state(out), len(leftovers(out))
        if not first.killed and first.rc != 0:
            raise RuntimeError(f"{name} seed {seed}: the run failed before the kill point:\n{first.tail()}")
        second = run(argv, logs / f"{name}-seed{seed}-rerun.log", timeout=stage.timeout)
        if second.rc == 0:
            diff = stage.compare(ref.out, out)
        else:
            diff = Diff(identical=False, notes=[f"the rerun failed ({second.rc}): {second.tail(600)}"])
        result = FaultResult(name, seed, what, first.killed, first.killed_at, state, left, second.rc == 0,
                             stage.reused(second.text()) if first.killed else None, diff.identical, diff.lost,
                             diff.duplicated, diff.notes[:6], round(first.seconds + second.seconds, 1))
        killed = (f"killed at {first.killed_at:.2f}s, {first.cpu:.1f} CPU s ({state})" if first.killed else
                  "finished before the kill point")
        self.say(f"[{name}] seed {seed}: {what}; {killed}; rerun {'ok' if result.resumed else 'FAILED'}, "
                 f"{'identical' if diff.identical else 'DIFFERENT ' + '; '.join(diff.notes[:3])}, "
                 f"lost {diff.lost}, duplicated {diff.duplicated}")
        self.faults.append(result)
        return result

    def errors(self, name: str, cases: tuple[str, ...] = ("read-only", "disk-full"),
               finish: bool = True) -> list[ErrorResult]:
        """Read-only and disk-full runs of ``name`` (``finish``: then the same command without the fault)."""
        runs = {"prepare": _prepare_errors, "build-dataset": _build_errors, "train": _train_errors,
                "estep": _estep_errors}
        if name not in runs:
            return []
        results = runs[name](self, cases, finish)
        for r in results:
            self.say(f"[{name}] {r.case}: {'clear error' if r.clear else 'UNCLEAR'}: {r.message[:160]}; previous "
                     f"state {'intact' if r.intact else 'DAMAGED'}" + ("" if r.finished is None else
                                                                       f"; then finished: {r.finished}"))
        self.error_results += results
        return results


# ------------------------------------------------------------------------------------------------ error cases


def _snapshot(root: Path) -> dict[str, str | None]:
    """Digests of the visible files under ``root`` (what a reader of the outputs sees)."""
    names = [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return digests(root, names)


def _select(cases: tuple[str, ...], runs: dict[str, Callable[[], ErrorResult]]) -> list[ErrorResult]:
    return [case() for name, case in runs.items() if name in cases]


def _case(c: Campaign, stage: Stage, case: str, argv: list[str], limits: Limits,
          intact: Callable[[], tuple[bool, list[str]]], guard: Path | None = None) -> ErrorResult:
    """Run ``argv`` under ``limits`` (with ``guard`` read-only): it must fail clearly and keep ``intact``."""
    start = time.monotonic()
    log = c.root / "logs" / f"{stage.name}-{case}.log"
    if guard is not None:  # read-only: the directory is 0o555 while the command runs
        with read_only(guard):
            done = run(argv, log, limits=limits, timeout=stage.timeout)
    else:
        done = run(argv, log, limits=limits, timeout=stage.timeout)
    clear, message = clear_error(done, stage.command)
    ok, notes = intact()
    return ErrorResult(stage.name, case, clear, message, ok, None, notes, round(time.monotonic() - start, 1))


def _finish(c: Campaign, stage: Stage, out: Path, argv: list[str], results: list[ErrorResult],
            compare: Callable[[], Diff]) -> None:
    done = run(argv, c.root / "logs" / f"{stage.name}-errors-finish.log", timeout=stage.timeout)
    diff = compare() if done.rc == 0 else Diff(identical=False, notes=[done.tail(600)])
    for r in results:
        r.finished = done.rc == 0 and diff.identical
        r.notes += diff.notes[:3]


def _unchanged(root: Path, before: dict[str, str | None]) -> Callable[[], tuple[bool, list]]:
    """No visible file changed or appeared, and no new temporary file was left (the kill's own may remain)."""
    litter = set(leftovers(root))

    def check() -> tuple[bool, list[str]]:
        after = _snapshot(root)
        changed = [k for k in before if after.get(k) != before[k]]
        new = sorted(set(after) - set(before))
        left = sorted(set(leftovers(root)) - litter)
        notes = [f"changed {changed[:3]}"] * bool(changed) + [f"new {new[:3]}"] * bool(new) + \
            [f"left {left[:3]}"] * bool(left)
        return not (changed or new or left), notes

    return check


def _prepare_errors(c: Campaign, cases: tuple[str, ...], finish: bool) -> list[ErrorResult]:
    """A prepare killed half way, then rerun into a read-only directory, then with the disk full: each gives
    a clear error and leaves the finished shards untouched; the same command then completes them."""
    stage, ref = c.stages["prepare"], c.reference("prepare")
    out = c.root / "prepare" / "errors"
    shutil.rmtree(out, ignore_errors=True)
    argv = stage.argv(out)
    half = stage.shards() // 2
    run(argv, c.root / "logs" / "prepare-errors-killed.log", trigger=when(lambda: _count("docs-*.jsonl")(out) >= half))
    before = _snapshot(out)
    shard = min(p.stat().st_size for p in ref.out.glob("docs-*.jsonl"))
    results = _select(cases, {
        "read-only": lambda: _case(c, stage, "read-only", argv, Limits(read_only=True), _unchanged(out, before), out),
        "disk-full": lambda: _case(c, stage, "disk-full", argv, Limits(fsize=shard // 2), _unchanged(out, before))})
    if finish:
        _finish(c, stage, out, argv, results, lambda: stage.compare(ref.out, out))
    return results


def _build_errors(c: Campaign, cases: tuple[str, ...], finish: bool) -> list[ErrorResult]:
    """A finished dataset (a copy of the reference), rebuilt with another layout seed into a read-only
    directory, then with the disk full: clear errors, and the old dataset stays complete and loadable."""
    stage, ref = c.stages["build-dataset"], c.reference("build-dataset")
    out = c.root / "build-dataset" / "errors"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ref.out, out)
    argv = stage.argv(out, "data.seed=7")
    before = _snapshot(out)

    def intact() -> tuple[bool, list[str]]:
        ok, notes = _unchanged(out, before)()
        diff = stage.compare(ref.out, out)  # still the reference's dataset, loadable as such
        return ok and diff.identical, notes + diff.notes[:3]

    limit = (ref.out / "joint.bin").stat().st_size // 2
    results = _select(cases, {
        "read-only": lambda: _case(c, stage, "read-only", argv, Limits(read_only=True), intact, out),
        "disk-full": lambda: _case(c, stage, "disk-full", argv, Limits(fsize=limit), intact)})
    if finish:  # the rebuild itself then succeeds (and replaces the dataset whole)
        def rebuilt() -> Diff:
            d = Diff(compared=1)
            meta = json.loads((out / "joint.json").read_text())
            if meta["seed"] != 7 or idx_sequences(out / "joint.idx") != meta["counts"]["documents"]:
                d.differ("the rebuilt dataset does not match its sidecar")
            return d

        _finish(c, stage, out, argv, results, rebuilt)
    return results


def _train_errors(c: Campaign, cases: tuple[str, ...], finish: bool) -> list[ErrorResult]:
    """A finished training run (a copy of the reference), continued for more steps with its checkpoint
    directory read-only, then with the disk full at the next save: clear errors, and ``latest`` still names
    the reference's final checkpoint, which loads bit for bit."""
    stage, ref = c.stages["train"], c.reference("train")
    s = c.sizes
    out = c.root / "train" / "errors"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ref.out, out)
    final = _latest(ref.out)
    argv = stage.argv(out, f"train.train_iters={s.train_iters + s.save_interval}")

    def intact() -> tuple[bool, list[str]]:
        d = compare_checkpoint(ref.out / final, out / final)
        if _latest(out) != final:
            d.differ(f"latest names {_latest(out)}")
        if list(out.glob(".step_*.partial")):
            d.differ("a .partial checkpoint directory is left")
        return d.identical, d.notes[:3]

    limit = max(p.stat().st_size for p in (ref.out / final).glob("*.distcp")) // 2
    results = _select(cases, {
        "read-only": lambda: _case(c, stage, "read-only", argv, Limits(read_only=True), intact, out),
        "disk-full": lambda: _case(c, stage, "disk-full", argv, Limits(fsize=limit), intact)})
    if finish:
        def continued() -> Diff:
            d = Diff(compared=1)
            if _latest(out) != f"step_{s.train_iters + s.save_interval:08d}":
                d.differ(f"latest names {_latest(out)} after the continued run")
            return d

        _finish(c, stage, out, argv, results, continued)
    return results


def _estep_errors(c: Campaign, cases: tuple[str, ...], finish: bool) -> list[ErrorResult]:
    """An E-step killed after a few sampled batches, rerun with the disk full, then with its samples directory
    read-only: clear errors; the batches sampled before stay a prefix of the shard file; the same command then
    ends with the reference's samples and latents."""
    stage, ref = c.stages["estep"], c.reference("estep")
    out = c.root / "estep" / "errors"
    shutil.rmtree(out, ignore_errors=True)
    argv = stage.argv(out)
    partial = out / "samples" / "shard-00000.jsonl.partial"
    run(argv, c.root / "logs" / "estep-errors-killed.log",
        trigger=when(lambda: partial.is_file() and partial.read_bytes().count(NEWLINE) >= 2))
    kept = partial.read_bytes()

    def intact() -> tuple[bool, list[str]]:
        now = partial.read_bytes() if partial.is_file() else (out / "samples" / "shard-00000.jsonl").read_bytes()
        return now.startswith(kept), [] if now.startswith(kept) else ["the sampled batches changed"]

    limit = (ref.out / "samples" / "shard-00000.jsonl").stat().st_size // 2
    results = _select(cases, {
        "disk-full": lambda: _case(c, stage, "disk-full", argv, Limits(fsize=max(limit, len(kept) + 1)), intact),
        "read-only": lambda: _case(c, stage, "read-only", argv, Limits(read_only=True), intact, out / "samples")})
    if finish:
        _finish(c, stage, out, argv, results, lambda: stage.compare(ref.out, out))
    return results


# ------------------------------------------------------------------------------------------------ tally


def tally(faults: list[FaultResult], errors: list[ErrorResult]) -> dict[str, int]:
    killed = [f for f in faults if f.killed]
    return {
        "faults injected": len(killed),
        "kill points missed (run finished first)": len(faults) - len(killed),
        "runs resumed": sum(f.resumed for f in killed),
        "artifacts identical": sum(f.identical for f in killed),
        "data lost (records)": sum(f.lost + f.duplicated for f in faults),
        "storage faults tried (read-only, disk full)": len(errors),
        "clear errors given": sum(e.clear for e in errors),
        "previous state intact": sum(e.intact for e in errors),
    }


def results_json(faults: list[FaultResult], errors: list[ErrorResult]) -> dict[str, Any]:
    return {"faults": [asdict(f) for f in faults], "storage_faults": [asdict(e) for e in errors],
            "tally": tally(faults, errors)}
