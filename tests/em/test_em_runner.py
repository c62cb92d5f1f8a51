"""`bolt em` entry points that need no training: the Slurm dry run through the CLI, and the report table."""

from __future__ import annotations

from megatron_bolt import cli
from megatron_bolt.em.runner import summary_table
from tests.conftest import ROOT


def test_em_slurm_dry_run_takes_cluster_overrides(tmp_path, capsys):
    rc = cli.main(["em", "--config", str(ROOT / "examples" / "tinyllama_finemath.yaml"), "--launcher", "slurm",
                   "--cluster", str(ROOT / "examples" / "cluster.yaml"), "--dry-run", "cluster.train.nodes=2",
                   f"em.run_dir={tmp_path}", "estep.num_shards=5"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    train = [line for line in lines if "--job-name=bolt-iter1-train" in line]
    assert len(train) == 1 and "--nodes=2" in train[0] and "'--dependency=afterok:<iter1/build>'" in train[0]
    sample = [line for line in lines if "--job-name=bolt-iter1-sample" in line]
    assert len(sample) == 1 and "--array=0-4" in sample[0] and "'--dependency=afterok:<iter0/export>'" in sample[0]
    assert not (tmp_path / "config.yaml").exists()  # a dry run writes nothing


def test_summary_table_shows_every_iteration():
    it0 = {"iteration": 0, "accuracy": {"value": 0.25, "ci_low": 0.2, "ci_high": 0.3, "n": 200},
           "elbo": {"1": -9.5, "2": -9.1}, "estep_elbo": None, "ess_mean": None,
           "train": {"final_loss": 0.9, "tokens": 1000}, "seconds": {"train": 10.0, "eval": 2.5}}
    it1 = {**it0, "iteration": 1, "accuracy": None, "elbo": None, "estep_elbo": {"1": -8.0}, "ess_mean": 1.5}
    table = summary_table({"iterations": [it0, it1]}).splitlines()
    assert len(table) == 3
    assert "25.0% [20%,30%]" in table[1] and "-9.10" in table[1] and "12.5" in table[1]
    assert "-8.00" in table[2] and "1.50" in table[2]
