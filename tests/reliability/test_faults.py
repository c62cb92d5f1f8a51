"""The crash campaign's fast subset (benchmarks/reliability.py runs all of it, with a tally).

Each case SIGKILLs a real ``bolt`` command's whole process group at a seeded point (tests/reliability/campaign.py
says which), reruns the same command and compares what it wrote with an uninterrupted run's output: byte for
byte, and checkpoint tensors bit for bit. Here: ``bolt prepare`` at two seeds (a time inside its work, a number
of finished shards), ``bolt build-dataset`` half way through writing the dataset, ``bolt train`` while a
checkpoint is being saved. Storage faults: prepare into a read-only directory and onto a full disk (then the
same command finishes the job), build-dataset and train onto a full disk over a finished dataset / checkpoint:
each exits with one ``bolt CMD: ...`` line naming the path and the cause, and the previous state stays loadable.

Killing ``bolt estep`` mid-shard and ``bolt em`` mid-train and mid-sample is tested by tests/estep/test_estep.py and
tests/em/test_quickstart.py (each minutes long); the benchmark covers them with this harness too.
"""

from __future__ import annotations

import pytest

from tests.reliability.campaign import QUICK, Campaign, ErrorResult, FaultResult
from tests.reliability.faults import read_only_enforced

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Campaign:
    # overlap: a reference that is not needed to place the kill runs beside the killed run.
    return Campaign(tmp_path_factory.mktemp("faults"), QUICK, say=print, overlap=True)


def _recovered(r: FaultResult) -> None:
    assert r.killed, f"{r.stage} seed {r.seed}: the run ended before the kill point ({r.trigger})"
    assert r.resumed, r.notes
    assert r.identical and r.lost == 0 and r.duplicated == 0, (r.trigger, r.state, r.notes)


@pytest.mark.parametrize("seed", [0, 1])
def test_prepare_killed_then_rerun_writes_identical_shards(campaign, seed):
    r = campaign.fault("prepare", seed)
    _recovered(r)
    if r.trigger.startswith("shards"):  # shards finished before the kill are kept, not redone
        assert r.reused, r


def test_build_dataset_killed_mid_write_then_rerun_is_identical(campaign):
    r = campaign.fault("build-dataset", 0)
    assert r.trigger.startswith("bytes")
    _recovered(r)


def test_train_killed_during_a_checkpoint_save_resumes_to_identical_weights(campaign):
    r = campaign.fault("train", 0)
    assert r.trigger.startswith("save") and "half-written .step_" in r.state, r.state
    _recovered(r)
    assert r.reused, "the rerun did not resume from the checkpoint published before the kill"


def _storage(results: list[ErrorResult], finished: bool) -> None:
    assert results
    for r in results:
        assert r.clear, f"{r.stage} {r.case}: not a clear error: {r.message}"
        assert "[E" in r.message or "could not save" in r.message, r.message  # names the cause
        assert r.intact, f"{r.stage} {r.case}: the previous state changed: {r.notes}"
        if finished:
            assert r.finished, f"{r.stage} {r.case}: the same command did not finish afterwards: {r.notes}"


def test_prepare_read_only_and_full_disk_give_clear_errors_and_resume(campaign, tmp_path):
    cases = ("read-only", "disk-full") if read_only_enforced(tmp_path) else ("disk-full",)
    _storage(campaign.errors("prepare", cases=cases), finished=True)


@pytest.mark.parametrize("stage", ["build-dataset", "train"])
def test_full_disk_gives_a_clear_error_and_keeps_the_previous_output(campaign, stage):
    _storage(campaign.errors(stage, cases=("disk-full",), finish=False), finished=False)


def test_an_output_path_that_cannot_be_created_is_one_line_not_a_traceback(tmp_path, capsys):
    from megatron_bolt.cli import main

    corpus, blocker = tmp_path / "corpus.jsonl", tmp_path / "a-file"
    corpus.write_text('{"text": "One. Two."}\n')
    blocker.write_text("not a directory")
    rc = main(["prepare", f"prepare.input=[{corpus}]", f"prepare.output_prefix={blocker}/out/docs"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"bolt prepare: Not a directory: {blocker}/out"), err
