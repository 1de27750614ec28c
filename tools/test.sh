#!/usr/bin/env bash
# Set up (install megaent with its test extra) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
