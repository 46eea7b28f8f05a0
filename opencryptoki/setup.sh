#!/usr/bin/env bash
# openCryptoki (Debian package `opencryptoki`, 3.8.1 on Debian 12), keybroker's third CI token:
# its soft token (libpkcs11_sw.so) in several slots, for the end-to-end suite to claim one each.
#
#   opencryptoki/setup.sh start   install the package if missing, write the slot configuration,
#                                 start the slot daemon pkcsslotd, initialise every token;
#                                 prints the module path (the only line on stdout)
#   opencryptoki/setup.sh stop    stop the pkcsslotd this script started
#
# Why it looks like this (docs/src/portability.md, "openCryptoki"):
# * openCryptoki needs its slot daemon: C_Initialize fails with CKR_HOST_MEMORY when pkcsslotd is
#   not running. CI has no init system, so this script starts and stops it itself (as root; the
#   package's systemd unit is not used).
# * 3.8.1 has fixed paths: /etc/opencryptoki/opencryptoki.conf, /var/lib/opencryptoki/<token>,
#   /var/lock/opencryptoki/<token>, /var/run/pkcsslotd.socket. This script REWRITES the system
#   configuration (the original is kept once as opencryptoki.conf.keybroker-orig): slots
#   SLOT_BASE.. SLOT_BASE+SLOTS-1, each a soft token with its own `tokname`, whose data directory
#   /var/lib/opencryptoki/<tokname> is a symbolic link into STATE (a directory the tests own).
#   Use it on a CI or development machine, not on one whose openCryptoki serves anything else.
# * Each token is initialised with pkcsconf: a label and a random user PIN (STATE/user.pin, mode
#   0600). The SO PIN stays openCryptoki's default, 87654321 (STATE/so.pin): 3.8.1 keeps the
#   token's master key encrypted under the SO PIN, and after a C_SetPIN of the SO PIN a later
#   C_InitToken leaves the SO unable to log in (CKR_FUNCTION_FAILED, measured). The e2e harness
#   empties the token it claims (hsm-probe clear: every key object destroyed; hsm-fixtures'
#   opencryptoki.rs), so every test starts on an empty token; it does not re-initialise it,
#   because 3.8.1 keeps counting the sessions of a broker that was killed, and C_InitToken
#   then fails with CKR_SESSION_EXISTS (measured). Test tokens only.
#
# Environment: OPENCRYPTOKI_STATE (default ${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/opencryptoki),
# OPENCRYPTOKI_SLOTS (default 6), OPENCRYPTOKI_SLOT_BASE (default 10).
set -euo pipefail

STATE="${OPENCRYPTOKI_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/opencryptoki}"
SLOTS="${OPENCRYPTOKI_SLOTS:-6}"
BASE="${OPENCRYPTOKI_SLOT_BASE:-10}"
CONF=/etc/opencryptoki/opencryptoki.conf
PIDFILE=/var/run/pkcsslotd.pid

log() { echo "opencryptoki/setup.sh: $*" >&2; }

module() {
  for m in /usr/lib/*/pkcs11/libopencryptoki.so /usr/lib/pkcs11/libopencryptoki.so /usr/lib64/pkcs11/libopencryptoki.so; do
    [ -f "$m" ] && { echo "$m"; return 0; }
  done
  return 1
}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

stop() {
  if running; then
    pid="$(cat "$PIDFILE")"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    log "stopped pkcsslotd ($pid)"
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "usage: opencryptoki/setup.sh start|stop" >&2; exit 2 ;;
esac

[ "$(id -u)" -eq 0 ] || { log "must run as root (openCryptoki 3.8.1 keeps its tokens and socket in system paths)"; exit 1; }
if ! module >/dev/null || ! command -v pkcsslotd >/dev/null; then
  log "installing opencryptoki"
  apt-get update -qq
  # The package's maintainer script tries to start the service; without an init system it
  # only says so.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencryptoki >/dev/null 2>&1
fi
MODULE="$(module)" || { log "libopencryptoki.so not found after installing opencryptoki"; exit 1; }
getent group pkcs11 >/dev/null || groupadd -r pkcs11

stop
# A fresh start: the daemon's shared memory and every token.
rm -f /var/run/pkcsslotd.socket /dev/shm/var.lib.opencryptoki.* 2>/dev/null || true
rm -rf "$STATE"
mkdir -p "$STATE/tokens" "$STATE/claims"
chgrp pkcs11 "$STATE/tokens"
chmod 0770 "$STATE/tokens"

[ -f "$CONF.keybroker-orig" ] || cp "$CONF" "$CONF.keybroker-orig"
{
  echo "# Written by keybroker's opencryptoki/setup.sh (the original: $CONF.keybroker-orig)."
  echo "version opencryptoki-3.1"
  for i in $(seq 0 $((SLOTS - 1))); do
    echo "slot $((BASE + i))"
    echo "{"
    echo "stdll = libpkcs11_sw.so"
    echo "tokname = kbtest$i"
    echo "}"
  done
} >"$CONF.tmp"
mv "$CONF.tmp" "$CONF"

for i in $(seq 0 $((SLOTS - 1))); do
  tok="kbtest$i"
  mkdir -p "$STATE/tokens/$tok/TOK_OBJ" "/var/lock/opencryptoki/$tok" /var/log/opencryptoki
  chgrp -R pkcs11 "$STATE/tokens/$tok" "/var/lock/opencryptoki/$tok" /var/lock/opencryptoki
  chmod -R 0770 "$STATE/tokens/$tok" "/var/lock/opencryptoki/$tok"
  rm -rf "/var/lib/opencryptoki/$tok"
  ln -s "$STATE/tokens/$tok" "/var/lib/opencryptoki/$tok"
done

/usr/sbin/pkcsslotd
for _ in $(seq 100); do running && [ -S /var/run/pkcsslotd.socket ] && break; sleep 0.05; done
running || { log "pkcsslotd did not start"; exit 1; }
log "started pkcsslotd ($(cat "$PIDFILE")) with $SLOTS soft-token slots from $BASE"

so=87654321
user="$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')"
( umask 077; printf '%s' "$so" >"$STATE/so.pin"; printf '%s' "$user" >"$STATE/user.pin" )
for i in $(seq 0 $((SLOTS - 1))); do
  slot=$((BASE + i))
  echo "kb-ock-$i" | pkcsconf -I -c "$slot" -S "$so" >/dev/null
  pkcsconf -u -c "$slot" -S "$so" -n "$user" >/dev/null
done
for i in $(seq 0 $((SLOTS - 1))); do echo "$((BASE + i)) kb-ock-$i"; done >"$STATE/slots"
log "initialised $SLOTS tokens (labels kb-ock-0..; SO PIN in $STATE/so.pin, user PIN in $STATE/user.pin)"
echo "$MODULE"
