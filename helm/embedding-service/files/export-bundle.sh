#!/bin/sh
# Export the model bundle into $BUNDLE_DIR unless a finished one is there (manifest.json is
# written last). The export goes to a per-pod temporary directory on the same volume and is then
# renamed into place, so a killed export never leaves a half-written bundle behind and two pods
# exporting at once cannot mix their files. Extra arguments go to embed-export.
set -eu
mkdir -p "${TMPDIR:-/tmp}"
: "${BUNDLE_SOURCE:?}" "${BUNDLE_DIR:?}" "${BUNDLE_PRECISION:?}"
if [ -f "$BUNDLE_DIR/manifest.json" ]; then
  echo "bundle present: $BUNDLE_DIR"
  exit 0
fi
tmp="$BUNDLE_DIR.partial-$(hostname)"
rm -rf "$tmp"
echo "exporting $BUNDLE_SOURCE ($BUNDLE_PRECISION) -> $BUNDLE_DIR"
embed-export --model "$BUNDLE_SOURCE" --out "$tmp" --precision "$BUNDLE_PRECISION" "$@"
# mv -T renames onto a missing or empty directory and refuses a non-empty one (another pod won).
if ! mv -T "$tmp" "$BUNDLE_DIR" 2>/dev/null; then
  rm -rf "$tmp"
  [ -f "$BUNDLE_DIR/manifest.json" ] || { echo "cannot move the bundle into $BUNDLE_DIR" >&2; exit 1; }
fi
echo "bundle ready: $BUNDLE_DIR"
