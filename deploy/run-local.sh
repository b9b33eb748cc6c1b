#!/usr/bin/env bash
# One command on a fresh machine: set up ./.venv and run the daemon on its embedded defaults
# (bundled model, SQLite under ~/.local/state/qc-daemon, AE title QC_DAEMON, port 11112).
# Extra arguments go to `qc-daemon serve`, e.g. deploy/run-local.sh --config config.toml
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup-venv.sh
config=()
if [ "${1:-}" = "--config" ]; then config=(--config "$2"); shift 2; fi
exec .venv/bin/qc-daemon "${config[@]}" serve "$@"
