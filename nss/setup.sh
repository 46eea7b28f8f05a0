#!/usr/bin/env bash
# NSS's softoken behind p11-kit's proxy, the way docs/src/portability.md ("NSS softoken through
# p11-kit's proxy") tells a deployer to set it up, for the end-to-end test that checks what
# keybroker makes of it (tests/e2e/portability.rs, `nss_softoken_through_p11_kit_*`).
#
#   nss/setup.sh    install the packages if missing (Debian: libnss3, libnss3-tools,
#                   p11-kit-modules), make an NSS database with a random password (the user PIN,
#                   STATE/user.pin, mode 0600), register it with p11-kit; prints the proxy
#                   module's path (the only line on stdout)
#
# p11-kit reads no per-user module configuration as root, so this writes
# /etc/pkcs11/modules/keybroker-nss-test.module: use it on a CI or development machine. The
# softoken's configuration reaches it in C_Initialize's pReserved through that file's
# `x-init-reserved`, which keybroker cannot pass itself.
#
# Environment: NSS_STATE (default ${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/nss).
set -euo pipefail

STATE="${NSS_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/nss}"
MODULE_CONF=/etc/pkcs11/modules/keybroker-nss-test.module

log() { echo "nss/setup.sh: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "needs root (it writes $MODULE_CONF)"; exit 1; }

need=()
command -v certutil >/dev/null || need+=(libnss3-tools)
proxy=""
for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
  [ -e "$d/p11-kit-proxy.so" ] && { proxy="$d/p11-kit-proxy.so"; break; }
done
[ -n "$proxy" ] || need+=(p11-kit-modules)
softokn=""
for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
  [ -e "$d/libsoftokn3.so" ] && { softokn="$d/libsoftokn3.so"; break; }
done
[ -n "$softokn" ] || need+=(libnss3)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  exec "$0" "$@"
fi

# A fresh database each time: the tests own it, and a stale one would keep keys of an earlier run.
rm -rf "$STATE"
mkdir -p "$STATE/nssdb"
chmod 0700 "$STATE"
(umask 077; head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/user.pin")
certutil -N -d "sql:$STATE/nssdb" -f "$STATE/user.pin" >&2

mkdir -p "$(dirname "$MODULE_CONF")"
cat > "$MODULE_CONF" <<CONF
# Written by keybroker's nss/setup.sh for its tests: NSS's softoken behind p11-kit's proxy.
module: $softokn
x-init-reserved: configdir='sql:$STATE/nssdb' certPrefix='' keyPrefix='' secmod='secmod.db'
enable-in: keybroker
CONF
log "NSS database $STATE/nssdb (PIN in $STATE/user.pin), registered in $MODULE_CONF"
echo "$proxy"
