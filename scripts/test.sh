#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU.
# Triton kernels run through TRITON_INTERPRET=1 inside their own tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
