#!/usr/bin/env bash
# Builds the Kryoptic PKCS#11 module (libkryoptic_pkcs11.so) from its crates.io source, against
# Debian's OpenSSL 3.0, and caches it outside the repository so a second run is instant.
#
# Why this way (see docs/src/hsm-notes.md, "Kryoptic 1.5.4"): Kryoptic's default features need OpenSSL >= 3.2 (for
# EdDSA); Debian 12 ships 3.0. Without default features and with the list below it builds
# against the system OpenSSL and still has everything keybroker uses (AES incl. GCM and RFC 5649
# as CKM_AES_KEY_WRAP_KWP, RSA-OAEP with SHA-256, the sqlite token store).
#
# The source comes from crates.io through cargo itself (a throwaway project that depends on
# `kryoptic = "=VERSION"`, then `cargo fetch`): no other download is needed or possible here.
#
# Prints the path of the built module on stdout (the only line on stdout); progress on stderr.
#   kryoptic/build.sh            build if not cached, print the path
#   kryoptic/build.sh --force    rebuild
# Environment: KRYOPTIC_VERSION (default 1.5.4), XDG_CACHE_HOME, CARGO_BUILD_JOBS.
set -euo pipefail

VERSION="${KRYOPTIC_VERSION:-1.5.4}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/kryoptic-$VERSION"
SO="$CACHE/libkryoptic_pkcs11.so"
FEATURES="kryoptic-lib/dynamic,kryoptic-lib/sqlitedb,kryoptic-lib/aes,kryoptic-lib/ecc_min,kryoptic-lib/ec_montgomery,kryoptic-lib/ffdh,kryoptic-lib/hash_all,kryoptic-lib/kdf_all,kryoptic-lib/rsa"

log() { echo "kryoptic/build.sh: $*" >&2; }

if [ -f "$SO" ] && [ "${1:-}" != "--force" ]; then
  log "cached: $SO"
  echo "$SO"
  exit 0
fi

command -v cargo >/dev/null || { log "cargo is required (https://rustup.rs)"; exit 1; }

# Debian build dependencies: bindgen needs libclang; openssl-sys and the sqlite store link the
# system libraries found through pkg-config; jq reads cargo's metadata below.
need=()
for p in libclang-dev pkg-config libssl-dev libsqlite3-dev jq; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { log "need root (or sudo) to install: ${need[*]}"; exit 1; }
    sudo=sudo
  fi
  log "installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. Fetch the exact crate (and its dependencies) with cargo.
mkdir -p "$work/fetch/src"
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "kryoptic-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
kryoptic = "=$VERSION"

[workspace]
EOF
: >"$work/fetch/src/lib.rs"
log "fetching kryoptic $VERSION from crates.io"
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml"
src="$(cargo metadata --format-version 1 --manifest-path "$work/fetch/Cargo.toml" 2>/dev/null |
  jq -r --arg v "$VERSION" '.packages[] | select(.name == "kryoptic" and .version == $v) | .manifest_path' |
  head -n1)"
[ -n "$src" ] && [ -f "$src" ] || { log "could not locate the kryoptic $VERSION source after cargo fetch"; exit 1; }
src="$(dirname "$src")"

# 2. Build a copy (never write into cargo's registry cache).
cp -r "$src" "$work/kryoptic"
log "building (release, no default features; a few minutes on 2 cores)"
(
  cd "$work/kryoptic"
  CARGO_TARGET_DIR="$work/target" cargo build --release --quiet \
    --no-default-features --features "$FEATURES" --lib
)
built="$(find "$work/target/release" -maxdepth 1 -name 'libkryoptic_pkcs11.so' | head -n1)"
[ -n "$built" ] || { log "the build produced no libkryoptic_pkcs11.so"; exit 1; }

mkdir -p "$CACHE"
cp "$built" "$SO.tmp"
mv "$SO.tmp" "$SO"
log "built $SO"
echo "$SO"
