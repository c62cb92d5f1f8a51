#!/usr/bin/env bash
# Queue the whole EM loop on Slurm: one sbatch job (or array) per stage, chained with afterok.
#
#   bash slurm/submit_em.sh --config examples/tinyllama_finemath.yaml --cluster examples/cluster.yaml \
#       cluster.account=my_account [--dry-run]
#
# The arguments go to `python -m megatron_bolt.launch.slurm` unchanged (its --help lists them). Python: BOLT_PYTHON,
# else this checkout's .venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${BOLT_PYTHON:-$root/.venv/bin/python}" -m megatron_bolt.launch.slurm "$@"
