"""The bad-input campaign, one test per case of tests/reliability/bad_inputs.py.

Every case runs through ``megatron_bolt.cli.main`` and must end in a clear one-line error, a counted and
reported skip with every good record delivered, or the odd input kept as plain data; never a traceback, a
silent drop, or the teacher API key in an output. The cases that build a model share one tiny checkpoint
and are marked slow. ``python tests/reliability/bad_inputs.py`` runs the same campaign and prints the tally.
"""

from __future__ import annotations

import re
from pathlib import Path

import bad_inputs as campaign  # tests/reliability is on sys.path: test directories are not packages
import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


@pytest.fixture(scope="module")
def fixtures(workdir) -> campaign.Fixtures:
    return campaign.Fixtures(workdir / "_shared")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.model else [])
                                  for c in campaign.CASES])
def test_bad_input_gets_a_clear_error_or_a_counted_skip(case, workdir, fixtures):
    result = campaign.run_case(case, workdir, fixtures)
    assert result.ok, (f"{case.name}: expected {case.expect}, got {result.outcome}: {result.detail} "
                       f"(records lost {result.data_lost}, key leaks {result.leaks})")


# What the issue asks the campaign to cover, as case-name patterns; each must match at least one case.
COVERAGE = {
    "malformed JSONL": r"prepare-malformed-jsonl", "truncated Parquet": r"prepare-truncated-parquet",
    "wrong keys": r"prepare-wrong-text-key|build-latents-wrong-keys", "empty documents": r"prepare-empty",
    "huge documents": r"prepare-huge", "invalid UTF-8": r"invalid-utf8|not-utf8", "null bytes": r"null",
    "special-token strings": r"special-token", "chat-template markers": r"chat-template|special-token-strings",
    "latents longer than the context": r"latent-too-long|longer-than-context|unit-longer",
    "impossible parallel layouts": r"config-(tp|pp|world|sp)", "checkpoint of another architecture":
    r"other-architecture", "tokenizer without latent tokens": r"tokenizer-without-latent-tokens",
    "malformed teacher output": r"synthesize-teacher",
}


@pytest.mark.parametrize("what", sorted(COVERAGE))
def test_campaign_covers_every_category_of_the_issue(what):
    assert any(re.search(COVERAGE[what], c.name) for c in campaign.CASES), what


def test_case_names_are_unique_and_every_case_says_what_the_user_sees():
    names = [c.name for c in campaign.CASES]
    assert len(names) == len(set(names))
    for case in campaign.CASES:
        assert case.expect in ("error", "counted", "accepted") and case.message and case.what
        if case.expect != "error":
            assert case.check is not None, f"{case.name}: a skip or an accepted input needs a check"


def run(rc, out="", err="", crash=None, d=Path(".")) -> campaign.Run:
    return campaign.Run(d, rc, out, err, "", crash)


def test_judge_tells_crashes_vague_errors_and_silent_drops_apart(tmp_path):
    error = campaign.Case("e", "train", "x", lambda d, fx: [], "error", r"must divide")
    assert campaign.judge(error, run(2, err="bolt train: 3 must divide 4\n", d=tmp_path)).outcome == "clear_error"
    assert campaign.judge(error, run(None, crash="KeyError: 'x' (a.py:1)", d=tmp_path)).outcome == "crash"
    traceback = "Traceback (most recent call last):\n  File ...\nValueError: 3 must divide 4\n"
    assert campaign.judge(error, run(1, err=traceback, d=tmp_path)).outcome == "crash"
    assert campaign.judge(error, run(1, err="bolt train: failed\n", d=tmp_path)).outcome == "unclear"
    assert campaign.judge(error, run(0, d=tmp_path)).outcome == "unclear"  # accepted what it should refuse
    dropped = campaign.Case("s", "prepare", "x", lambda d, fx: [], "counted", "bad_json", check=lambda r: 2)
    result = campaign.judge(dropped, run(0, out="prepare: ...\n", d=tmp_path))
    assert result.outcome == "counted_skip" and result.data_lost == 2 and not result.ok
    leaked = campaign.judge(error, run(2, err=f"bolt train: key {campaign.SECRET} must divide\n", d=tmp_path))
    assert leaked.leaks == 1 and not leaked.ok


def test_run_all_and_the_tally_for_the_benchmark_script(tmp_path):
    names = ["prepare-malformed-jsonl-line", "config-tp-not-dividing-heads", "prepare-special-token-strings"]
    results = campaign.run_all(tmp_path, quick=True, names=names)
    assert sorted(r.case for r in results) == sorted(names) and all(r.ok for r in results)
    tally = campaign.Tally.of(results)
    assert (tally.tried, tally.clear_errors, tally.counted_skips, tally.accepted) == (3, 1, 1, 1) and tally.ok
    text = campaign.table(results)
    assert "bad inputs tried          3" in text and "data lost (records)       0" in text
    assert not any(c.model for c in campaign.select(quick=True))
