"""All throughput benchmarks in one command: M-step, E-step sampling and scoring, one summary with ratios.

    .venv/bin/python benchmarks/throughput.py --preset cpu-tiny --out runs/throughput-all-cpu.json
    python3 benchmarks/throughput.py --preset tinyllama-h100 --out throughput-h100.json \\
        [--train-args "--micro-batch 8"] [--only train score]

Runs, each in its own Python process (so that a crash or an out-of-memory in one does not hide the others,
and each starts with all memory free), with the same ``--preset``:

- ``train``: ``benchmarks/train_throughput.py``: M-step trained tokens/s and MFU of ``bolt train``'s step
  vs a bare megatron-core loop vs a plain PyTorch/HF loop, same model, same batch;
- ``sample``: ``benchmarks/sample_throughput.py``: E-step generated tokens/s per generation backend that
  imports here (hf always; trtllm, vllm where installed), each against hf;
- ``score``: ``benchmarks/score_throughput.py``: teacher-forced scored tokens/s of our Megatron scorer vs
  an HF forward + log_softmax with the same weights, and whether the two agree.

Each script writes its JSON next to ``--out`` (``<out stem>-<stage>.json``); this one collects them, prints
one table (tokens/s, MFU on GPU, and the ratios each script measured within its own run, which hold on a
noisy machine where absolute figures do not) and writes everything, with the commands, the commit, the
1-minute load average before and after each stage and the wall time of each, to ``--out``. The exit status
is 1 when a stage failed (its row says so), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = {
    "train": ("train_throughput.py", "M-step", "trained tokens/s, median step"),
    "sample": ("sample_throughput.py", "E-step sampling", "generated tokens/s, one pass"),
    "score": ("score_throughput.py", "scoring", "scored tokens/s, fastest pass"),
}
PRESETS = ("cpu-tiny", "tinyllama-h100")


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def git_commit() -> dict:
    """The commit and whether tracked files differ from it (read-only plumbing; untracked files not seen)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("diff-index", "--name-only", "HEAD", "--")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "tracked_changes": None if changed is None else bool(changed)}


def run_stage(stage: str, preset: str, out: Path, extra: list[str], timeout: float | None) -> dict:
    script = HERE / STAGES[stage][0]
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python  # .venv/bin/python, as typed
    out_arg = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out  # the stage runs in ROOT
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    cmd = [str(python), str(script), "--preset", preset, "--out", str(out_arg), *extra]
    out.unlink(missing_ok=True)  # a stale file must not pass for this run's result
    print(f"\n=== {stage}: {shlex.join(cmd)}", flush=True)
    record = {"command": shlex.join(cmd), "loadavg_start": loadavg()}
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = None
        record["error"] = f"timed out after {timeout:.0f} s"
    record |= {"seconds": round(time.perf_counter() - start, 1), "loadavg_end": loadavg(), "returncode": rc}
    if rc not in (0, None):
        record["error"] = f"exit status {rc}" + (" (killed: out of memory?)" if rc in (-9, 137) else "")
    if out.is_file() and rc == 0:
        record["result"] = json.loads(out.read_text())
    elif "error" not in record:
        record["error"] = f"no JSON written to {out}"
    return record


# --------------------------------------------------------------------------------------------- summary


def train_rows(r: dict) -> list[tuple]:
    rows = []
    for name, loop in r["loops"].items():
        if "tokens_per_s" not in loop:
            rows.append((name, None, None, loop.get("error", "failed")))
            continue
        ratio = r["ratios"].get(f"bolt/{name}")
        rows.append((name, loop["tokens_per_s"], loop["mfu"], f"bolt/{name} {ratio:.3f}" if ratio else ""))
    return rows


def sample_rows(r: dict) -> list[tuple]:
    rows = [(x["backend"], x["generated_tokens_per_s"], None,
             f"{x['backend']}/hf {x['ratio_vs_hf']:.3f}" if x["backend"] != "hf" else "") for x in r["results"]]
    # The reason's first clause ("backend 'vllm' needs the 'vllm' package, which is not installed"); all in JSON.
    rows += [(name, None, None, f"skipped: {why.split(':')[0]}") for name, why in r.get("skipped", {}).items()]
    rows += [(name, None, None, f"failed: {why}") for name, why in r.get("failed", {}).items()]
    return rows


def score_rows(r: dict) -> list[tuple]:
    a = r["agreement"]
    rows = []
    for name, impl in r["impls"].items():
        note = ""
        if name == "hf":
            rounds = r["ratio_per_round"]
            note = (f"bolt/hf {r['ratio']:.3f} (fastest passes; paired rounds median "
                    f"{r['ratio_paired_median']:.3f}, range {min(rounds):.3f}-{max(rounds):.3f})")
        elif name == "bolt":
            note = (f"{'agrees' if a['agree'] else 'DISAGREES'} with hf: max |diff| {a['max_abs_diff']:.1e}, "
                    f"mean {a['mean_abs_diff']:.1e}")
        rows.append((name, impl["tokens_per_s"], impl["mfu"], note))
    return rows


def summary_rows(stages: dict) -> list[tuple]:
    makers = {"train": train_rows, "sample": sample_rows, "score": score_rows}
    rows = []
    for stage, record in stages.items():
        label = f"{STAGES[stage][1]} ({STAGES[stage][2]})"
        if "result" not in record:
            rows.append((label, "-", None, None, f"FAILED: {record.get('error')}"))
            continue
        rows += [(label if i == 0 else "", *row) for i, row in enumerate(makers[stage](record["result"]))]
    return rows


def print_summary(report: dict) -> None:
    git = report["git"]
    dirty = " + working tree" if git["tracked_changes"] else ""
    print(f"\n=== throughput summary: preset {report['preset']}, {report['machine']}, {report['date']}, "
          f"commit {git['commit']}{dirty}")
    rows = report["summary"]
    width = max(len(r[0]) for r in rows)
    print(f"{'stage':{width}}  {'impl':8} {'tokens/s':>10} {'MFU':>6}  ratio / note")
    for label, name, rate, mfu, note in rows:
        rate_s = "-" if rate is None else f"{rate:,.0f}"
        mfu_s = "n/a" if mfu is None else f"{mfu:.1%}"
        print(f"{label:{width}}  {name:8} {rate_s:>10} {mfu_s:>6}  {note}")
    print("\nratios are measured within each script's own run (same process, same load); "
          "absolute tokens/s depend on the load:")
    for stage, record in report["stages"].items():
        la, lb = record["loadavg_start"], record["loadavg_end"]
        load = "n/a" if la is None else f"{la:.2f} -> {lb:.2f}"
        print(f"  {stage:6} {record['seconds']:7.1f} s, 1-min load average {load}: {record['command']}")


def machine(stages: dict) -> str:
    """The GPU the stages reported, else this machine's CPU model and core count."""
    for record in stages.values():
        device = ((record.get("result") or {}).get("environment") or {}).get("device", "")
        if device and not device.startswith("CPU"):
            return device
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, required=True)
    parser.add_argument("--out", type=Path, help="Combined JSON (default runs/throughput-<preset>.json); each "
                        "stage's own JSON goes next to it as <stem>-<stage>.json.")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), default=list(STAGES), help="Stages to run.")
    for stage in STAGES:
        parser.add_argument(f"--{stage}-args", default="", metavar="ARGS",
                            help=f"Extra arguments for {STAGES[stage][0]}, one shell-quoted string.")
    parser.add_argument("--timeout", type=float, help="Seconds per stage before it is killed (default: none).")
    args = parser.parse_args()
    out = (args.out or ROOT / "runs" / f"throughput-{args.preset}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stages = {}
    for stage in (s for s in STAGES if s in args.only):
        extra = shlex.split(getattr(args, f"{stage}_args"))
        stages[stage] = run_stage(stage, args.preset, out.with_name(f"{out.stem}-{stage}.json"), extra, args.timeout)
    report = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "machine": machine(stages), "git": git_commit(),
              "stages": stages}
    report["summary"] = summary_rows(stages)
    print_summary(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0 if all("result" in r for r in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
