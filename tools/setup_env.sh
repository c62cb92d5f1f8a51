#!/usr/bin/env bash
# Create .venv with Python 3.12 and install megatron-bolt exactly as locked in uv.lock.
#   bash tools/setup_env.sh            # core + dev tools + the eval and nemo (nemo-run launcher) extras
#   BOLT_EXTRAS="eval te" bash tools/setup_env.sh
# Idempotent: a second run only checks that the environment matches the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  # Candidates in order; each must actually run (a pyenv shim can exist for a version that is not active).
  local c candidates=()
  command -v python3.12 >/dev/null 2>&1 && candidates+=("$(command -v python3.12)")
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.12*/bin/python3.12; do candidates+=("$c"); done
  fi
  candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12)
  for c in "${candidates[@]}"; do
    if [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check uv
fi
UV_PYTHON="${UV_PYTHON:-$(find_python312)}" || { echo "setup_env: Python 3.12 not found (megatron-core 0.19 needs it); install it or set UV_PYTHON" >&2; exit 1; }
export UV_PYTHON

extras=()
for e in ${BOLT_EXTRAS:-eval}; do extras+=(--extra "$e"); done
uv sync --frozen --quiet --extra nemo "${extras[@]}"
echo "setup_env: ready ($(.venv/bin/python --version), megatron-core $(.venv/bin/python -c 'from importlib.metadata import version; print(version("megatron-core"))'))"
