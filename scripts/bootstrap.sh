#!/usr/bin/env bash
# Create .venv and install the project with the extras named in $1 (default: cpu,export,assets,dev).
# torch goes in first and pinned: an unpinned torch (or one pulled in by another package) is a
# multi-GB CUDA build, while torch==2.13.0 is the CPU wheel this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,export,assets,dev}"
python="${PYTHON:-python3}"
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(cat pyproject.toml client/pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [[ "$extras" == *export* ]]; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[${extras}]"
if [[ "$extras" == *dev* ]]; then
  # The client distribution (client/) with its CLI and tracing extras: its tests run in `make test`.
  .venv/bin/pip install -q -e "./client[bulk,otel]"
elif [[ "$extras" == *talk* ]]; then
  .venv/bin/pip install -q -e "./client"
fi
touch "$stamp"
