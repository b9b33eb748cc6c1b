#!/usr/bin/env bash
# One command on a fresh machine: set up ./.venv and run the daemon on its embedded defaults
# (bundled model, SQLite under ~/.local/state/qc-daemon, AE title QC_DAEMON, port 11112).
# Extra arguments go to `qc-daemon serve`, e.g. deploy/run-local.sh --config config.toml
set -euo pipefail
cd "$(dirname "$0")/.."
# Install only when .venv is missing or pyproject.toml changed since the last install (its hash is the stamp).
stamp=.venv/.installed-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/qc-daemon ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    bash deploy/setup-venv.sh
    echo "$want" > "$stamp"
fi
cat >&2 <<EOF
qc-daemon is installed as $PWD/.venv/bin/qc-daemon (not on PATH). To type \`qc-daemon\` in another terminal:
    mkdir -p ~/.local/bin && ln -sf "$PWD/.venv/bin/qc-daemon" ~/.local/bin/qc-daemon
(Do not \`source .venv/bin/activate\` for that: it puts pynetdicom's storescu/echoscu in front of DCMTK's.)
EOF
exec .venv/bin/qc-daemon serve "$@"
