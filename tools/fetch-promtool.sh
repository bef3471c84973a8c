#!/usr/bin/env bash
# Fetch promtool (Prometheus's checker) without a system install: `apt-get download` the pinned Debian
# package `prometheus` and unpack it with `dpkg-deb -x` under .cache/tools/. Idempotent: does nothing when the
# pinned promtool is already there. Prints the path of promtool on success.
# On a machine without apt-get/dpkg-deb it says so and exits 0: the tests that need promtool then skip with
# that reason. A failed download on a machine that has them is an error.
set -euo pipefail

VERSION="2.42.0+ds-5+deb12u1"   # Debian bookworm; promtool 2.42.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/tools/prometheus-$VERSION"
PROMTOOL="$DEST/usr/bin/promtool"

if [ -x "$PROMTOOL" ]; then
    echo "$PROMTOOL"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "fetch-promtool: $tool not found; promtool tests will be skipped" >&2
        exit 0
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "prometheus=$VERSION")
mkdir -p "$work/x"
dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
"$work/x/usr/bin/promtool" --version >/dev/null
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$work/x" "$DEST"    # only a complete, working extraction lands in the cache
echo "$PROMTOOL"
