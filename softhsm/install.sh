#!/usr/bin/env bash
# Installs what keybroker's development broker and test suite need on Debian/Ubuntu, when it is
# missing: SoftHSM2 (the CI token, Debian package softhsm2), OpenSSL's command line (an
# independent RSA-OAEP implementation used by the interop tests), a C compiler (ring and the
# bundled SQLite build C code) and PostgreSQL (Debian package postgresql: the replica tests run
# a private server from its initdb/pg_ctl, on loopback, in a temp dir). Idempotent; needs root
# or sudo only when something is missing.
set -euo pipefail

need=()
have_module=false
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
  [ -f "$m" ] && have_module=true
done
{ $have_module && command -v softhsm2-util >/dev/null; } || need+=(softhsm2)
command -v openssl >/dev/null || need+=(openssl)
command -v cc >/dev/null || need+=(gcc libc6-dev)
have_pg=false
for b in /usr/lib/postgresql/*/bin/initdb; do
  [ -x "$b" ] && have_pg=true
done
$have_pg || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
  echo "softhsm/install.sh: SoftHSM2, openssl, a C compiler and PostgreSQL are present"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "softhsm/install.sh: need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "softhsm/install.sh: installing ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
softhsm2-util --version >/dev/null
echo "softhsm/install.sh: done (SoftHSM2 $(softhsm2-util --version))"
