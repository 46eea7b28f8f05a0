#!/usr/bin/env bash
# Installs cargo-deny (the supply-chain checks of deny.toml, run by .ci/run) from its crates.io
# source with `cargo install --locked`, and caches the binary outside the repository so a second
# run is instant, as kryoptic/build.sh caches the Kryoptic module.
#
# Why a source build: these machines reach the package registries only, so a prebuilt release
# binary cannot be downloaded; `--locked` builds it with the dependency versions its authors
# published (Cargo.lock in the crate). About 4 minutes on 2 cores (3 m 52 s measured), once.
#
# Prints the path of the binary on stdout (the only line on stdout); progress on stderr.
#   tools/cargo-deny.sh            install if not cached, print the path
#   tools/cargo-deny.sh --force    reinstall
# Environment: CARGO_DENY_VERSION (default below), XDG_CACHE_HOME, CARGO_BUILD_JOBS.
# Use: "$(tools/cargo-deny.sh)" check --offline --locked licenses bans sources
set -euo pipefail

VERSION="${CARGO_DENY_VERSION:-0.20.2}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/cargo-deny-$VERSION"
BIN="$CACHE/bin/cargo-deny"

log() { echo "tools/cargo-deny.sh: $*" >&2; }

if [ -x "$BIN" ] && [ "${1:-}" != "--force" ]; then
  log "cached: $BIN"
  echo "$BIN"
  exit 0
fi

command -v cargo >/dev/null || { log "cargo is required (https://rustup.rs)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Install into a scratch root first, so that an interrupted build leaves no half-made cache.
log "installing cargo-deny $VERSION from crates.io (cargo install --locked; a few minutes once)"
CARGO_TARGET_DIR="$work/target" cargo install --quiet --locked --version "=$VERSION" \
  --root "$work/root" cargo-deny
[ -x "$work/root/bin/cargo-deny" ] || { log "cargo install produced no cargo-deny binary"; exit 1; }
got="$("$work/root/bin/cargo-deny" --version)"
[ "$got" = "cargo-deny $VERSION" ] || { log "expected cargo-deny $VERSION, got: $got"; exit 1; }

mkdir -p "$CACHE/bin"
cp "$work/root/bin/cargo-deny" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
log "installed $BIN"
echo "$BIN"
