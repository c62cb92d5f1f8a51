"""Data efficiency at toy scale: do latent thoughts beat raw data, and does BoLT improve across iterations?

    .venv/bin/python benchmarks/data_efficiency.py --preset quick --out runs/data_efficiency_quick
    .venv/bin/python benchmarks/data_efficiency.py --preset full --out runs/data_efficiency   # about an hour

The paper's claims, checked on the embedded arithmetic task with our real pipeline (bolt prepare,
build-dataset, train, export-hf, eval, estep, em) and the same raw documents and training steps for every
arm. Arms, each trained from scratch for ``steps`` optimizer steps:

- ``raw``: the raw documents, repeated (evaluated without a latent);
- ``teacher``: the same documents with the teacher's latents on every answer chunk;
- ``bolt-k{K}``: ``bolt em`` with K latents per chunk: a warm start on a teacher-labelled slice
  (``warm``, shared by every K), then ``iterations`` E-step/M-step rounds over the rest (the warm slice
  keeps its teacher latents), each M-step restarted from scratch.

Every arm runs for every seed (model init, data order, sampling); the corpus and the evaluation questions
are the same for all. Held-out accuracy comes with its 95% Wilson interval per run and, across seeds, a
t interval of the mean; the ELBO (``n = 1``: E_q[log p(Z, X) - log q(Z | X)] per answer chunk of held-out
documents) is shown for the latent models. Results: OUT/results.json, OUT/results.md and
OUT/data_efficiency.png. Jobs run as subprocesses, ``--jobs`` at a time (one thread each), and rerunning
the same command resumes: finished stages are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Preset:
    """Everything that shapes the experiment; the same for every arm and seed."""

    docs: int = 3000
    problems_per_doc: tuple[int, int] = (1, 1)
    templates: tuple[str, ...] = ("mul_add",)
    eval_questions: int = 400
    warm_split: str = "0:3:20"  # 15% of documents with teacher latents for the warm start
    bootstrap_split: str = "3:19:20"  # the documents the E-step labels
    heldout_split: str = "19:20:20"  # ELBO diagnostics only, never trained on
    layers: int = 3
    hidden: int = 96
    heads: int = 4
    ffn: int = 256
    seq_length: int = 128
    global_batch: int = 32
    steps: int = 1000
    lr: float = 2e-3
    ks: tuple[int, ...] = (1, 4)
    iterations: int = 3
    warm_raw: bool = True  # the warm start also sees the bootstrap documents as raw text (em.warm_raw_bootstrap)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 32
    sample_batch: int = 64


PRESETS = {
    "full": Preset(),
    "quick": Preset(iterations=1, seeds=(0,)),
    # Plumbing only (the test suite runs it): every arm and stage, seconds of training, no effect expected.
    "smoke": Preset(docs=120, eval_questions=20, layers=1, hidden=32, heads=2, ffn=64, global_batch=4, steps=6,
                    ks=(1, 2), iterations=1, seeds=(0,), max_new_tokens=28, sample_batch=32),
}


def bolt_config(p: Preset, corpus: Path, seed: int) -> dict[str, Any]:
    """The config shared by every stage of one seed (paths and arm settings are overrides)."""
    from megatron_bolt.data.tokenizer import BoltTokenizer

    tokenizer = str(corpus / "tokenizer")
    return {
        "model": {"num_layers": p.layers, "hidden_size": p.hidden, "num_attention_heads": p.heads,
                  "num_query_groups": p.heads, "ffn_hidden_size": p.ffn, "max_position_embeddings": p.seq_length,
                  "vocab_size": BoltTokenizer.from_pretrained(tokenizer).vocab_size},
        "data": {"tokenizer": tokenizer, "seq_length": p.seq_length, "seed": 1234 + seed},
        "train": {"micro_batch_size": p.global_batch, "global_batch_size": p.global_batch, "train_iters": p.steps,
                  "lr": p.lr, "min_lr": p.lr / 10, "lr_warmup_iters": max(1, p.steps // 20), "precision": "fp32",
                  "log_interval": 50, "seed": 1234 + seed},
        "estep": {"context_length": p.seq_length, "num_shards": 1, "chunk_pattern": "^A:",
                  "resample_seed": 7 + seed,
                  "sampling": {"backend": "hf", "device": "cpu", "num_samples": max(p.ks),
                               "max_new_tokens": p.max_new_tokens, "batch_size": p.sample_batch,
                               "max_batch_size": 256, "seed": 11 + seed}},
        "em": {"iterations": p.iterations, "keep_warm_latents": True, "restart_from_base": True,
               "warm_raw_bootstrap": p.warm_raw},
        "eval": {"task": "embedded", "latent": True, "backend": "hf", "batch_size": 200,
                 "max_new_tokens": p.max_new_tokens + 8, "data_path": str(corpus / "eval.jsonl")},
    }


# ----------------------------------------------------------------------------------------------- data


def prepare_data(p: Preset, out: Path) -> None:
    """The corpus, its teacher latents and the three splits (once for every seed and arm)."""
    from megatron_bolt.config.schema import PrepareConfig
    from megatron_bolt.data.embedded import generate_embedded
    from megatron_bolt.data.prepare import read_prepared, run_prepare

    corpus = out / "corpus"
    if not (corpus / "manifest.json").is_file():
        generate_embedded(corpus, p.docs, seed=0, num_eval=p.eval_questions, min_problems=p.problems_per_doc[0],
                          max_problems=p.problems_per_doc[1], templates=p.templates)
    for name, split in (("warm", p.warm_split), ("bootstrap", p.bootstrap_split), ("heldout", p.heldout_split)):
        run_prepare(PrepareConfig(input=[str(corpus / "corpus.jsonl")], output_prefix=str(out / "prepared" / name /
                                  "docs"), split=split, chunk_lambda=0.0), progress=False)
    for name in ("warm", "train"):
        keep = {d["doc_id"] for split in (["warm"] if name == "warm" else ["warm", "bootstrap"])
                for d in read_prepared(out / "prepared" / split / "docs")}
        dst = corpus / f"{name}_latents.jsonl"
        if not dst.is_file():
            lines = (corpus / "latents.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_text("".join(x for x in lines if json.loads(x)["doc_id"] in keep), encoding="utf-8")
            tmp.replace(dst)


# ----------------------------------------------------------------------------------------------- jobs


def bolt(argv: list[str]) -> None:
    from megatron_bolt.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"bolt {' '.join(argv)} failed with exit {rc}")


def write_config(data: dict[str, Any], path: Path) -> str:
    from megatron_bolt.config.loader import dump_yaml, from_dict
    from megatron_bolt.config.schema import BoltConfig

    path.parent.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(from_dict(BoltConfig, data))
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return str(path)


def run_direct(p: Preset, out: Path, seed: int, arm: str) -> None:
    """``raw`` or ``teacher``: build, train, export, evaluate (and, for teacher, the held-out ELBO)."""
    corpus, prepared, run = out / "corpus", out / "prepared", out / f"seed{seed}" / arm
    data = bolt_config(p, corpus, seed)
    data["eval"]["latent"] = arm == "teacher"
    config = write_config(data, run / "config.yaml")
    prefix, ckpt, hf = run / "data" / "joint", run / "checkpoints", run / "hf"
    docs = [str(prepared / "warm"), str(prepared / "bootstrap")]
    latents = [str(corpus / "train_latents.jsonl")] if arm == "teacher" else []
    if not Path(f"{prefix}.json").is_file():
        bolt(["build-dataset", "--config", config, f"build.documents={json.dumps(docs)}",
              f"build.latents={json.dumps(latents)}", f"build.output_prefix={prefix}"])
    if not (ckpt / f"step_{p.steps:08d}").is_dir():
        bolt(["train", "--config", config, f"data.data_prefix=[{prefix}]", f"train.checkpoint.save={ckpt}"])
    if not (hf / "config.json").is_file():
        bolt(["export-hf", "--config", config, "--ckpt", str(ckpt), "--out", str(hf)])
    if not (run / "eval" / "summary.json").is_file():
        bolt(["eval", "--config", config, "--ckpt", str(hf), f"eval.output_dir={run / 'eval'}"])
    if arm == "teacher" and not (run / "heldout" / "estep.json").is_file():
        bolt(["estep", "--config", config, "--stage", "all", "--ckpt", str(ckpt), "--hf-dir", str(hf),
              f"estep.documents=[{prepared / 'heldout'}]", f"estep.output_dir={run / 'heldout'}"])


def run_em(p: Preset, out: Path, seed: int, arm: str) -> None:
    """``warm`` (the warm start alone) or ``bolt-k{K}`` (the warm start copied in, then the iterations)."""
    corpus, prepared, run = out / "corpus", out / "prepared", out / f"seed{seed}" / arm
    data = bolt_config(p, corpus, seed)
    k = max(p.ks) if arm == "warm" else int(arm.removeprefix("bolt-k"))
    data["estep"]["sampling"]["num_samples"] = k
    data["em"].update(iterations=0 if arm == "warm" else p.iterations, run_dir=str(run),
                      warm_documents=[str(prepared / "warm")], warm_latents=[str(corpus / "warm_latents.jsonl")],
                      bootstrap_documents=[str(prepared / "bootstrap")], heldout_documents=[str(prepared / "heldout")])
    if arm != "warm":
        warm = out / f"seed{seed}" / "warm"
        if not (run / "iter0").is_dir():  # hard links: the warm start is the same for every K
            run.mkdir(parents=True, exist_ok=True)
            shutil.copytree(warm / "iter0", run / "iter0.tmp", copy_function=os.link, dirs_exist_ok=True)
            shutil.copytree(warm / "manifests" / "iter0", run / "manifests" / "iter0", copy_function=os.link,
                            dirs_exist_ok=True)
            (run / "iter0.tmp").rename(run / "iter0")
    config = write_config(data, out / f"seed{seed}" / f"{arm}.yaml")
    bolt(["em", "--config", config])


def run_job(p: Preset, out: Path, seed: int, arm: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    (run_direct if arm in ("raw", "teacher") else run_em)(p, out, seed, arm)


# ----------------------------------------------------------------------------------------------- results


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def latent_quality(corpus: Path, latents: Path) -> dict[str, float] | None:
    """How the E-step's chosen latents compare with the teacher's working on the same chunks.

    Fractions of chunks whose latent is the teacher's exactly, copies the question's three operands into the
    teacher's positions, and ends on the teacher's result (the answer, which the posterior sees).
    """
    import re

    from megatron_bolt.data.tokenizer import BoltTokenizer

    if not latents.is_file():
        return None
    tok = BoltTokenizer.from_pretrained(corpus / "tokenizer")
    with open(corpus / "latents.jsonl", encoding="utf-8") as f:
        teacher = {(r["doc_id"], r["chunk_index"]): r["latent"] for r in map(json.loads, f)}
    exact = operands = final = n = 0
    with open(latents, encoding="utf-8") as f:
        for r in map(json.loads, f):
            want, got = teacher[(r["doc_id"], r["chunk_index"])], tok.decode(r["latent_token_ids"]).strip()
            w, g = re.findall(r"\d+", want), re.findall(r"\d+", got)
            n += 1
            exact += got == want
            operands += len(g) == len(w) and all(g[i] == w[i] for i in (0, 1, 4))
            final += bool(g) and g[-1] == w[-1]
    return {"teacher_exact": exact / n, "operands": operands / n, "final": final / n} if n else None


def run_points(p: Preset, out: Path, seed: int) -> list[dict[str, Any]]:
    """One row per (arm, iteration) of one seed: accuracy (+ Wilson interval), ELBO, final loss, and for
    BoLT iterations the quality of the latents they were trained on."""
    from megatron_bolt.train.loop import read_metrics

    def point(arm: str, iteration: int | None, run: Path, heldout: Path | None) -> dict[str, Any] | None:
        ev = _read(run / "eval" / "summary.json")
        if ev is None:
            return None
        elbo = (_read(heldout) or {}).get("elbo", {}).get("1") if heldout else None
        history = read_metrics(run / "checkpoints")
        return {"arm": arm, "iteration": iteration, "seed": seed, "accuracy": ev["accuracy"], "elbo": elbo,
                "final_loss": history[-1]["loss"] if history else None}

    rows = [point("raw", None, out / f"seed{seed}" / "raw", None),
            point("teacher", None, out / f"seed{seed}" / "teacher", out / f"seed{seed}" / "teacher" / "heldout" /
                  "estep.json")]
    warm = out / f"seed{seed}" / "warm" / "iter0"
    rows.append(point("warm", 0, warm, warm / "heldout" / "estep.json"))
    for k in p.ks:
        for i in range(1, p.iterations + 1):
            it = out / f"seed{seed}" / f"bolt-k{k}" / f"iter{i}"
            row = point(f"bolt-k{k}", i, it, it / "heldout" / "estep.json")
            if row is not None:
                row["latents"] = latent_quality(out / "corpus", it / "estep" / "latents.jsonl")
            rows.append(row)
    return [r for r in rows if r is not None]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% t interval across seeds (the interval is the mean itself for one seed)."""
    t95 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 6: 2.44691, 7: 2.36462, 8: 2.30600,
           9: 2.26216}  # Student t, 97.5% quantile by degrees of freedom (1.96 beyond: a slight underestimate)
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, m, m
    half = t95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["iteration"]), []).append(r)
    table = []
    for (arm, it), rs in groups.items():
        acc = mean_ci([r["accuracy"]["value"] for r in rs])
        elbos = [r["elbo"] for r in rs if r["elbo"] is not None and math.isfinite(r["elbo"])]
        quality = [r["latents"] for r in rs if r.get("latents")]
        table.append({"arm": arm, "iteration": it, "seeds": len(rs), "accuracy": acc,
                      "latents": {k: statistics.fmean(q[k] for q in quality) for k in quality[0]} if quality else None,
                      "per_seed": [r["accuracy"]["value"] for r in rs],
                      "elbo": mean_ci(elbos) if elbos else None,
                      "final_loss": statistics.fmean(r["final_loss"] for r in rs if r["final_loss"] is not None)
                      if any(r["final_loss"] is not None for r in rs) else None})
    return table


def markdown(table: list[dict[str, Any]], p: Preset, seconds: float) -> str:
    lines = ["| arm | iteration | seeds | held-out accuracy (95% CI) | per seed | held-out ELBO (95% CI) | "
             "final train loss | E-step latents: teacher-exact / operands / result |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        m, lo, hi = r["accuracy"]
        acc = f"{100 * m:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"
        per = ", ".join(f"{100 * v:.1f}" for v in r["per_seed"])
        elbo = "-" if r["elbo"] is None else "{:.2f} ({:.2f} to {:.2f})".format(*r["elbo"])
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        it = "-" if r["iteration"] is None else str(r["iteration"])
        q = r.get("latents")
        quality = "-" if not q else " / ".join(f"{100 * q[k]:.0f}%" for k in ("teacher_exact", "operands", "final"))
        lines.append(f"| {r['arm']} | {it} | {r['seeds']} | {acc} | {per} | {elbo} | {loss} | {quality} |")
    lines.append(f"\n{p.steps} steps x {p.global_batch} rows x {p.seq_length} tokens per training run; "
                 f"wall time {seconds / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], p: Preset, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_elbo) = plt.subplots(1, 2, figsize=(11, 4))
    by = {(r["arm"], r["iteration"]): r for r in table}
    for arm, colour in (("raw", "tab:gray"), ("teacher", "tab:green")):
        if (arm, None) in by:
            m, lo, hi = by[(arm, None)]["accuracy"]
            ax_acc.axhline(100 * m, color=colour, label=arm)
            ax_acc.axhspan(100 * lo, 100 * hi, color=colour, alpha=0.15)
            if by[(arm, None)]["elbo"]:
                ax_elbo.axhline(by[(arm, None)]["elbo"][0], color=colour, label=arm)
    for k, colour in zip(p.ks, ("tab:blue", "tab:orange", "tab:red", "tab:purple"), strict=False):
        pts = [by.get(("warm", 0))] + [by.get((f"bolt-k{k}", i)) for i in range(1, p.iterations + 1)]
        xs = [i for i, r in enumerate(pts) if r]
        for ax, key, scale in ((ax_acc, "accuracy", 100), (ax_elbo, "elbo", 1)):
            ys = [(i, pts[i][key]) for i in xs if pts[i][key]]
            if ys:
                ax.errorbar([i for i, _ in ys], [scale * v[0] for _, v in ys],
                            yerr=[[scale * (v[0] - v[1]) for _, v in ys], [scale * (v[2] - v[0]) for _, v in ys]],
                            marker="o", capsize=3, color=colour, label=f"BoLT K={k}")
    ax_acc.set(xlabel="EM iteration (0 = warm start)", ylabel="held-out accuracy (%)",
               title="Accuracy (mean of seeds, 95% CI)")
    ax_elbo.set(xlabel="EM iteration (0 = warm start)", ylabel="ELBO per answer chunk (nats)",
                title="Held-out ELBO (n = 1)")
    for ax in (ax_acc, ax_elbo):
        ax.legend(fontsize=8)
        ax.set_xticks(range(p.iterations + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- driver


def schedule(p: Preset, arms: list[str]) -> list[tuple[int, str, str | None]]:
    """(seed, arm, the job it waits for); BoLT arms wait for their seed's warm start."""
    jobs = []
    for seed in p.seeds:
        for arm in arms:
            jobs.append((seed, arm, "warm" if arm.startswith("bolt-") else None))
    return jobs


def apply_overrides(p: Preset, items: list[str]) -> Preset:
    """``FIELD=VALUE`` overrides of a preset; tuple fields take comma-separated values."""
    for item in items:
        key, _, value = item.partition("=")
        if key not in Preset.__dataclass_fields__:
            raise SystemExit(f"--set {item}: unknown field {key!r} (fields: {', '.join(Preset.__dataclass_fields__)})")
        current = getattr(p, key)
        if isinstance(current, tuple):
            p = replace(p, **{key: tuple(type(current[0])(v) for v in value.split(",") if v)})
        elif isinstance(current, bool):
            p = replace(p, **{key: value.lower() in ("1", "true", "yes")})
        else:
            p = replace(p, **{key: type(current)(value)})
    return p


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", default=None, help="Output directory (default: runs/data_efficiency_PRESET).")
    parser.add_argument("--jobs", type=int, default=2, help="Jobs run at once, one thread each.")
    parser.add_argument("--arms", nargs="*", default=None, help="Subset of: raw teacher warm bolt-kK.")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="Preset overrides, e.g. steps=2000 seeds=0,1 (tuples comma-separated).")
    parser.add_argument("--job", nargs=2, metavar=("SEED", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    p = apply_overrides(PRESETS[args.preset], args.set)
    out = Path(args.out or f"runs/data_efficiency_{args.preset}")
    if args.job:
        run_job(p, out, int(args.job[0]), args.job[1])
        return 0

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "preset.json").write_text(json.dumps(asdict(p), indent=1) + "\n", encoding="utf-8")
    prepare_data(p, out)
    arms = args.arms or ["raw", "teacher", "warm", *(f"bolt-k{k}" for k in p.ks)]
    futures: dict[tuple[int, str], Any] = {}
    base = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--out", str(out),
            *(("--set", *args.set) if args.set else ())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def launch(seed: int, arm: str, after: str | None) -> None:
        if after and (seed, after) in futures:
            futures[(seed, after)].result()
        log = out / f"seed{seed}" / f"{arm}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "a", encoding="utf-8") as f:
            rc = subprocess.run([*base, "--job", str(seed), arm], env=env, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        print(f"  seed {seed} {arm}: {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            raise RuntimeError(f"seed {seed} {arm} failed: {log}")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # Warm starts first, so the BoLT arms waiting for them never hold both workers.
        order = sorted(schedule(p, arms), key=lambda j: (j[1] != "warm", j[2] is not None, j[0]))
        for seed, arm, after in order:
            futures[(seed, arm)] = pool.submit(launch, seed, arm, after if "warm" in arms else None)
        failed = [key for key, fut in futures.items() if fut.exception() is not None]

    rows = [r for seed in p.seeds for r in run_points(p, out, seed)]
    table = summarise(rows)
    seconds = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"preset": asdict(p), "rows": rows, "table": table,
                                                  "seconds": seconds}, indent=1) + "\n", encoding="utf-8")
    md = markdown(table, p, seconds)
    (out / "results.md").write_text(md, encoding="utf-8")
    plot(table, p, out / "data_efficiency.png")
    print(md)
    if failed:
        print(f"failed jobs: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
