//! Kryoptic tokens in private directories.
//!
//! Kryoptic (a PKCS#11 soft token in Rust on OpenSSL, crate `kryoptic`) is keybroker's second CI
//! token: an implementation independent of SoftHSM2, with PKCS#11 3.x behaviour (RFC 5649 as
//! `CKM_AES_KEY_WRAP_KWP`, SHA-256 OAEP, `CKR_ENCRYPTED_DATA_INVALID` for a bad GCM tag). The
//! module is built from its crates.io source by `kryoptic/build.sh` (see that script for why it
//! is built rather than installed).
//!
//! Kryoptic reads `KRYOPTIC_CONF` (a TOML file naming each slot's sqlite database) once, at
//! `C_Initialize`, per process; like SoftHSM2, a token made here is used by *child processes*
//! started with the token's environment. It has no `softhsm2-util`: the token is initialised
//! through PKCS#11 itself (`C_InitToken`, SO login, `C_InitPIN`) by `hsm-probe init-token`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result, io_err};

/// The Kryoptic release keybroker is tested with (keep in step with `kryoptic/build.sh`).
pub const VERSION: &str = "1.5.4";

/// The slot number every fixture token uses.
pub const SLOT: u64 = 1;

/// The Kryoptic module: `KRYOPTIC_MODULE`, else where `kryoptic/build.sh` caches it
/// (`${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/kryoptic-VERSION/libkryoptic_pkcs11.so`).
pub fn module_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KRYOPTIC_MODULE") {
        return Ok(PathBuf::from(p));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| Error::Setup("neither XDG_CACHE_HOME nor HOME is set".into()))?;
    Ok(cache
        .join("keybroker")
        .join(format!("kryoptic-{VERSION}"))
        .join("libkryoptic_pkcs11.so"))
}

/// Whether the Kryoptic module has been built (or `KRYOPTIC_MODULE` points at one).
pub fn available() -> bool {
    module_path().map(|p| p.exists()).unwrap_or(false)
}

/// Writes a Kryoptic configuration with one sqlite-backed slot. `mechanisms`, when given, is
/// the slot's `mechanisms` list: `["DENY", "CKM_AES_GCM"]` hides a mechanism from the token (to
/// imitate an HSM that lacks it); an allow list without `"DENY"` keeps only those named.
pub fn write_conf(conf: &Path, db: &Path, mechanisms: Option<&[&str]>) -> Result<()> {
    let mut text = format!(
        "# Written by hsm-fixtures: a private Kryoptic configuration.\n\
         [[slots]]\n\
         slot = {SLOT}\n\
         dbtype = \"sqlite\"\n\
         dbargs = \"{}\"\n",
        db.display()
    );
    if let Some(m) = mechanisms {
        let list: Vec<String> = m.iter().map(|s| format!("\"{s}\"")).collect();
        text.push_str(&format!("mechanisms = [{}]\n", list.join(", ")));
    }
    fs::write(conf, text).map_err(io_err(format!("write {}", conf.display())))
}

/// Initialises the token in `conf`'s slot with `hsm-probe init-token` (a child process, since
/// Kryoptic reads its configuration once per process).
pub fn init_token(
    hsm_probe: &Path,
    module: &Path,
    conf: &Path,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<()> {
    let out = Command::new(hsm_probe)
        .arg("init-token")
        .arg(module)
        .arg(SLOT.to_string())
        .args([label, so_pin, user_pin])
        .env("KRYOPTIC_CONF", conf)
        .output()
        .map_err(io_err(format!("run {}", hsm_probe.display())))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "hsm-probe init-token failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
