#!/usr/bin/env bash
# Checks that vendor/cryptoki/src is exactly the cryptoki release it names plus the patches in
# vendor/cryptoki/patches/ (applied in order), or rewrites those patches from the vendored source.
#
#   tools/cryptoki-patches.sh            check (exit 1 and show the difference if not)
#   tools/cryptoki-patches.sh --write    regenerate every patch from vendor/cryptoki/src
#
# The pristine release comes from crates.io through cargo itself (a throwaway project that
# depends on `cryptoki = "=VERSION"`, then `cargo fetch`), into cargo's own registry cache.
# Which files belong to which patch is listed below (FILES); vendor/cryptoki/PATCHES.md says why
# each patch exists and what would let us drop it.
set -euo pipefail
cd "$(dirname "$0")/.."

VENDOR=vendor/cryptoki
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$VENDOR/Cargo.toml" | head -1)
declare -A FILES=(
  [0001-aes-key-wrap-kwp.patch]="src/mechanism/mod.rs"
  [0002-single-call-encrypt-decrypt.patch]="src/session/mod.rs src/session/sized.rs src/session/encryption.rs src/session/decryption.rs"
  [0003-unwrap-template.patch]="src/object.rs src/session/object_management.rs"
  [0004-tolerant-token-clock.patch]="src/slot/token_info.rs"
)

log() { echo "tools/cryptoki-patches.sh: $*" >&2; }

pristine() {
  local home="${CARGO_HOME:-$HOME/.cargo}" dir
  dir=$(ls -d "$home"/registry/src/*/"cryptoki-$VERSION" 2>/dev/null | head -1 || true)
  if [ -z "$dir" ]; then
    local work
    work=$(mktemp -d)
    mkdir -p "$work/src"
    printf '[package]\nname = "cryptoki-fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncryptoki = "=%s"\n' \
      "$VERSION" >"$work/Cargo.toml"
    echo 'fn main() {}' >"$work/src/main.rs"
    log "fetching cryptoki $VERSION from crates.io"
    (cd "$work" && cargo fetch --quiet) >&2
    rm -rf "$work"
    dir=$(ls -d "$home"/registry/src/*/"cryptoki-$VERSION" | head -1)
  fi
  echo "$dir"
}

ORIG=$(pristine)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "${1:-}" = "--write" ]; then
  for patch in "${!FILES[@]}"; do
    out="$VENDOR/patches/$patch"
    : >"$out"
    for f in ${FILES[$patch]}; do
      a="$ORIG/$f"
      [ -f "$a" ] || a=/dev/null
      # diff exits 1 when the files differ: that is the point.
      diff -uN --label "a/$f" --label "b/$f" "$a" "$VENDOR/$f" >>"$out" || true
    done
    log "wrote $out"
  done
  exit 0
fi

cp -r "$ORIG/src" "$work/src"
for patch in "$VENDOR"/patches/*.patch; do
  (cd "$work" && patch --quiet -p1 --no-backup-if-mismatch) <"$patch"
done
if diff -ruN "$work/src" "$VENDOR/src"; then
  log "ok: $VENDOR/src = cryptoki $VERSION + $(ls "$VENDOR"/patches/*.patch | wc -l) patches"
else
  log "$VENDOR/src differs from cryptoki $VERSION + its patches (above); regenerate with --write"
  exit 1
fi
