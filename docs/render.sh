#!/usr/bin/env bash
# Renders docs/architecture.dot to docs/architecture.svg, after checking that
# the crate edges in the .dot (crate_a -> crate_b, nodes named crate_*) are
# exactly the workspace's direct normal dependencies as `cargo tree` sees them.
#
#   docs/render.sh          check, then render
#   docs/render.sh --check  check only (no Graphviz needed)
#
# Needs cargo; rendering needs Graphviz's `dot` (apt-get install graphviz).
set -euo pipefail
cd "$(dirname "$0")/.."

dot_file=docs/architecture.dot
svg_file=docs/architecture.svg

# Edges drawn: "qflare-a -> qflare-b", one a line, sorted.
drawn="$(grep -oE '^[[:space:]]*crate_[a-z_]+[[:space:]]*->[[:space:]]*crate_[a-z_]+' "$dot_file" \
  | sed -E 's/[[:space:]]//g; s/crate_//g; s/->/ -> /; s/_/-/g' | sort -u)"

# Edges in the workspace: each member's direct, non-dev, non-build
# dependencies on other members (default features; --no-dedupe so every
# member lists its own).
actual="$(cargo tree --workspace --edges normal --depth 1 --prefix depth --no-dedupe --quiet \
  | awk '/^0qflare-/ { sub(/^0/, ""); split($0, a, " "); from = a[1]; next }
         /^1qflare-/ { sub(/^1/, ""); split($0, a, " "); print from " -> " a[1] }' \
  | sort -u)"

if [ -z "$actual" ]; then
  echo "render: cargo tree listed no dependencies between workspace crates" >&2
  exit 1
fi
if [ "$drawn" != "$actual" ]; then
  echo "render: the crate edges in $dot_file differ from cargo tree:" >&2
  diff <(echo "$drawn") <(echo "$actual") | sed -n 's/^< /  drawn, not a dependency: /p; s/^> /  missing from the drawing: /p' >&2
  exit 1
fi
echo "render: $(echo "$actual" | wc -l) crate edges match cargo tree"

if [ "${1:-}" = "--check" ]; then
  exit 0
fi
if ! command -v dot >/dev/null 2>&1; then
  echo "render: Graphviz's dot is missing (apt-get install graphviz)" >&2
  exit 1
fi
dot -Tsvg "$dot_file" -o "$svg_file"
echo "render: wrote $svg_file"
