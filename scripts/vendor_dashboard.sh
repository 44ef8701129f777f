#!/usr/bin/env bash
# Re-vendors the dashboard's chart library (uPlot) from the npm registry:
#   bash scripts/vendor_dashboard.sh [VERSION]      (default: the version vendored now)
# `npm pack` downloads the package tarball and checks it against the registry's integrity hash;
# the minified browser build, its CSS and the licence are copied unmodified into
# cloud/api/dashboard/vendor/uplot/. Update the table in vendor/README.md with the new version.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-1.6.32}
dest=cloud/api/dashboard/vendor/uplot
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$version" >/dev/null)
tar -xzf "$work/uplot-$version.tgz" -C "$work"
mkdir -p "$dest"
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" \
   "$work/package/LICENSE" "$dest/"
echo "vendored uplot $version into $dest ($(npm view "uplot@$version" dist.integrity))"
