#!/usr/bin/env bash
# Measures CKA_UNWRAP_TEMPLATE enforcement on a fresh token (see unwrap-template.c; the results
# are quoted in docs/src/lifecycle.md, "What the domain protects against"):
#   softhsm/probes/unwrap-template.sh            # SoftHSM2
#   softhsm/probes/unwrap-template.sh kryoptic   # Kryoptic (built by kryoptic/build.sh)
# Needs gcc and libp11-kit-dev (for pkcs11.h) besides what tests/run installs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
cc -O1 -Wall -I/usr/include/p11-kit-1 -o "$dir/probe" "$here/unwrap-template.c" -ldl
if [ "${1:-softhsm}" = kryoptic ]; then
  module="$("$root/kryoptic/build.sh")"
  printf '[[slots]]\nslot = 1\ndbtype = "sqlite"\ndbargs = "%s/token.sql"\n' "$dir" > "$dir/token.conf"
  export KRYOPTIC_CONF="$dir/token.conf"
  (cd "$root" && cargo build --quiet --locked -p hsm-fixtures --bin hsm-probe)
  "$root/target/debug/hsm-probe" init-token "$module" 1 probe 87654321 12345678 >/dev/null
else
  module="${MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
  mkdir "$dir/tokens"
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir" > "$dir/softhsm2.conf"
  export SOFTHSM2_CONF="$dir/softhsm2.conf"
  softhsm2-util --init-token --free --label probe --so-pin 87654321 --pin 12345678 >/dev/null
fi
"$dir/probe" "$module" probe 12345678
