#!/usr/bin/env bash
# styleray's GPU check: one command on a machine with one CUDA GPU (see benchmarks/gpu_check.py for the steps).
#   bash benchmarks/gpu_check.sh [--dry-run] [--rehearse] [--no-ray] [--out DIR]
# Needs only python with torch (+ numpy, pillow, pytest); uses .venv/bin/python when there is one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then py="$here/.venv/bin/python"; else py="$(command -v python3 || command -v python)"; fi
fi
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/benchmarks/gpu_check.py" "$@"
