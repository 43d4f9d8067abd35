#!/usr/bin/env bash
# Idempotent, quiet set-up shared by main_job.sh and test.sh:
#   .venv (python3 -m venv) with this package installed editable (+ test extras),
#   Debian's dataset-fashion-mnist when its files are missing.
# A second run does nothing and takes a second or two.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
LOG="${TMPDIR:-/tmp}/transnext-setup.log"
PY=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist

say() { echo "[setup] $*"; }

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv >>"$LOG" 2>&1
fi

if ! .venv/bin/python - "$ROOT" >/dev/null 2>&1 <<'PYEOF'
import sys, importlib.util as u
import transnext, timm, torch, torchvision, tqdm, safetensors, pytest  # noqa: F401
import onnxscript, matplotlib, build, transformers, scipy, pycocotools  # noqa: F401  (test extras added later)
assert transnext.__file__.startswith(sys.argv[1] + "/src/"), transnext.__file__
PYEOF
then
    say "installing the package and its dependencies into .venv (log: $LOG)"
    .venv/bin/python -m pip install -q --upgrade pip >>"$LOG" 2>&1 || true
    if ! .venv/bin/python -m pip install -q -e ".[test]" >>"$LOG" 2>&1; then
        echo "[setup] pip install failed; the last lines of $LOG:" >&2
        tail -20 "$LOG" >&2
        exit 1
    fi
fi

if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] || [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
    say "installing Debian's dataset-fashion-mnist"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
            echo "[setup] need root (or sudo) to apt-get install dataset-fashion-mnist" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >>"$LOG" 2>&1; then
        echo "[setup] apt-get install dataset-fashion-mnist failed; the last lines of $LOG:" >&2
        tail -20 "$LOG" >&2
        exit 1
    fi
fi
say "ready"
