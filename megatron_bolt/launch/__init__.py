"""Launchers that run the EM stage plan (megatron_bolt.em.plan) on a cluster: plain sbatch, or nemo-run."""
