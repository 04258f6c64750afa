#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, type-check and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/repo -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
ruff check src tests bench
ruff format --check src tests bench
echo "== mypy"
mypy
echo "== pytest"
# cheap key derivation in tests only; the real cost is used everywhere else
export VMVAULT_TEST_CHEAP_KDF=1
python3 -m pytest -q "$@"
