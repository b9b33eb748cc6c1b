#!/usr/bin/env bash
# Create ./.venv and install qc-daemon into it.
#   deploy/setup-venv.sh            the daemon's runtime only (no torch)
#   deploy/setup-venv.sh postgres   + the PostgreSQL driver (psycopg 3), for a shared database
#   deploy/setup-venv.sh dev        + trainer, export, PostgreSQL and test dependencies (CPU build of torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "dev" ]; then
    # The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
    # GPU users: see README, "Training on a GPU".
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[trainer,export,postgres,dev]"
elif [ "${1:-}" = "postgres" ]; then
    .venv/bin/python -m pip install --quiet -e ".[postgres]"
else
    .venv/bin/python -m pip install --quiet -e .
fi
