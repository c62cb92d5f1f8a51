"""The reliability campaign: kill every pipeline stage at seeded points, rerun, compare; storage faults; bad inputs.

    .venv/bin/python benchmarks/reliability.py                       # all five stages, 3 seeds each (~20 min, 2 cores)
    .venv/bin/python benchmarks/reliability.py --quick               # smaller inputs, 1 seed, quick bad inputs
    .venv/bin/python benchmarks/reliability.py --stages prepare train --seeds 5 --out runs/reliability

For each stage (``bolt prepare``, ``build-dataset``, ``train``, ``estep``, ``em``; tests/reliability/campaign.py):
one uninterrupted reference run, then per seed a run whose whole process group is SIGKILLed at a seeded
point (a time inside its work, or a progress point: finished shards, dataset bytes, a checkpoint save in flight,
sampled batches, an EM stage), the same command again to the end, and a comparison with the reference (bytes;
checkpoint tensors bit for bit; records lost or duplicated). Then the storage faults (read-only output directory,
disk full through RLIMIT_FSIZE) of the stages that write large outputs, and the bad-input campaign of
tests/reliability/bad_inputs.py when it is there. Prints one line per fault, then the tally; writes everything
as JSON to OUT/reliability.json (work files under OUT/work: a rerun with the same settings reuses the references).
Exits non-zero when anything was lost, differed or failed unclearly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.reliability is a namespace package of the checkout

from tests.reliability.campaign import FULL, QUICK, STAGES, Campaign, results_json, tally  # noqa: E402
from tests.reliability.faults import read_only_enforced  # noqa: E402


def _bad_inputs(workdir: Path, quick: bool) -> tuple[list[str], dict | None, bool]:
    """(tally lines, tally as a dict, ok) of tests/reliability/bad_inputs.py, loaded by path; absent is fine."""
    path = ROOT / "tests" / "reliability" / "bad_inputs.py"
    if not path.is_file():
        return ["bad inputs: module not found"], None, True
    spec = importlib.util.spec_from_file_location("bad_inputs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        results = module.run_all(workdir, quick=quick)
        counts = module.Tally.of(results)
    except Exception as exc:  # another helper's module: report, do not hide the crash campaign's results
        return [f"bad inputs: failed to run ({type(exc).__name__}: {exc})"], None, False
    as_dict = asdict(counts) if is_dataclass(counts) else dict(vars(counts))
    return list(counts.lines()), as_dict, bool(getattr(counts, "ok", True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, help="Kills per stage (default 3; 1 with --quick).")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--out", default="runs/reliability", help="Results JSON and work files go here.")
    p.add_argument("--quick", action="store_true", help="Smaller inputs, 1 seed, the quick bad-input cases.")
    p.add_argument("--no-storage", action="store_true", help="Skip the read-only and disk-full cases.")
    p.add_argument("--no-bad-inputs", action="store_true", help="Skip the bad-input campaign.")
    args = p.parse_args()
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, load_before = time.monotonic(), os.getloadavg()[0]
    campaign = Campaign(out / "work" / ("quick" if args.quick else "full"), QUICK if args.quick else FULL,
                        say=lambda line: print(line, flush=True))
    cases = ("read-only", "disk-full") if read_only_enforced(out / "work") else ("disk-full",)
    if "read-only" not in cases:
        print("read-only cases skipped: this user can write into 0o555 directories (root without CAP_SETPCAP)")
    seconds: dict[str, float] = {}
    for stage in args.stages:
        t0 = time.monotonic()
        campaign.reference(stage)
        for seed in range(seeds):
            campaign.fault(stage, seed)
        if not args.no_storage:
            campaign.errors(stage, cases=cases)
        seconds[stage] = round(time.monotonic() - t0, 1)
        print(f"[{stage}] {seconds[stage]:.0f}s", flush=True)

    bad_lines, bad, bad_ok = ["bad inputs: skipped"], None, True
    if not args.no_bad_inputs:
        t0 = time.monotonic()
        bad_lines, bad, bad_ok = _bad_inputs(out / "work" / "bad-inputs", args.quick)
        seconds["bad inputs"] = round(time.monotonic() - t0, 1)

    counts = tally(campaign.faults, campaign.error_results)
    total = round(time.monotonic() - start, 1)
    print("\n".join(["", "crash campaign", *(f"  {k:<44} {v}" for k, v in counts.items()),
                     "", "bad-input campaign", *(f"  {line}" for line in bad_lines)]))
    clear = counts["clear errors given"] + (bad or {}).get("clear_errors", 0)
    tried = counts["storage faults tried (read-only, disk full)"] + (bad or {}).get("tried", 0)
    lost = counts["data lost (records)"] + (bad or {}).get("data_lost", 0)
    summary = {"faults injected": counts["faults injected"], "runs resumed": counts["runs resumed"],
               "artifacts identical": counts["artifacts identical"], "bad inputs tried": (bad or {}).get("tried"),
               "clear errors given": f"{clear} (of {tried} bad inputs and storage faults; the rest are counted skips "
                                     "or accepted inputs)" if bad else clear,
               "data lost": lost}
    print("\n".join(["", "tally", *(f"  {k:<20} {v}" for k, v in summary.items()),
                     f"  {'wall time':<20} {total:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())}); "
                     f"1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"]))

    ok = (counts["runs resumed"] == counts["artifacts identical"] == counts["faults injected"] and lost == 0
          and counts["clear errors given"] == counts["previous state intact"] == len(campaign.error_results)
          and bad_ok)
    report = {**results_json(campaign.faults, campaign.error_results), "bad_inputs": bad, "summary": summary,
              "ok": ok, "seconds": seconds, "wall_seconds": total, "argv": sys.argv[1:],
              "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
              "machine": f"{platform.node()} {platform.machine()}, {platform.processor() or 'cpu'}",
              "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "reliability.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nresults: {out / 'reliability.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
