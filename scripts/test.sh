#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU.
# Triton kernels run through TRITON_INTERPRET=1 inside their own tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One intra-op thread per process: on a shared 2-core machine a second thread
# makes small ops many times slower, and the torchrun test starts two processes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The set-up pins a triton whose CPU interpreter works: its kernel tests must run, not skip.
export TRANSNEXT_REQUIRE_TRITON_INTERPRETER=1
exec .venv/bin/python -m pytest -q "$@"
