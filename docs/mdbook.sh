#!/usr/bin/env bash
# Installs mdbook, the tool that builds this book, from crates.io with cargo and caches it
# outside the repository, so a second run is instant (as kryoptic/build.sh does for Kryoptic).
#
# Pinned and built with `--locked` so every machine and CI build the book with the same tool.
# Only the `search` feature: `serve` and `watch` (a web server and a file watcher, for writing
# the book interactively) are left out, which roughly halves the build; `mdbook build` needs
# neither. mdbook 0.5.4 needs Rust >= 1.88.
#
# Prints the path of the mdbook binary on stdout (the only line on stdout); progress on stderr.
#   docs/mdbook.sh               install if not cached, print the path
#   docs/mdbook.sh --force       reinstall
# Environment: MDBOOK_VERSION (default 0.5.4), XDG_CACHE_HOME, CARGO_BUILD_JOBS.
set -euo pipefail

VERSION="${MDBOOK_VERSION:-0.5.4}"
ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/mdbook-$VERSION"
BIN="$ROOT/bin/mdbook"

log() { echo "docs/mdbook.sh: $*" >&2; }

if [ -x "$BIN" ] && [ "${1:-}" != "--force" ]; then
  log "cached: $BIN"
  echo "$BIN"
  exit 0
fi

command -v cargo >/dev/null || { log "cargo is required (https://rustup.rs)"; exit 1; }

log "installing mdbook $VERSION from crates.io into $ROOT (a few minutes on 2 cores)"
# cargo install builds in a temporary target directory of its own and only copies the binary
# into --root once the build succeeded, so an interrupted run leaves no half-installed tool.
cargo install mdbook --locked --version "=$VERSION" --no-default-features --features search \
  --root "$ROOT" --force --quiet >&2
[ -x "$BIN" ] || { log "cargo install produced no $BIN"; exit 1; }
log "installed $BIN"
echo "$BIN"
