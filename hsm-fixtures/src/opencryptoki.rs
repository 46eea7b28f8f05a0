//! openCryptoki soft tokens, one claimed per test.
//!
//! openCryptoki (Debian's `opencryptoki` 3.8.1) is keybroker's third CI token: a PKCS#11 2.20
//! implementation with a slot daemon (`pkcsslotd`), no AES-GCM, no AES key wrap, no
//! CKA_COPYABLE/CKA_ALLOWED_MECHANISMS, and a token clock that is not `YYYYMMDDhhmmss00`. Its
//! paths are fixed system paths, so tokens cannot be made per test in a temporary directory as
//! for SoftHSM2 and Kryoptic: `opencryptoki/setup.sh start` configures several soft-token
//! slots (data in a directory it owns), starts the daemon and initialises them, and each test
//! *claims* a free slot (an exclusive lock on a file in the state directory, held as long as
//! the [`Claim`] lives) and empties its token (`hsm-probe clear`), so it starts with no keys.
//! Not `C_InitToken`: openCryptoki 3.8.1 keeps counting the sessions of a process that was
//! killed (a test's broker), and `C_InitToken` then fails with `CKR_SESSION_EXISTS`. Slots are
//! released when the test's token is dropped.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{Error, Result, io_err};

/// Where Debian and others put the module.
pub const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib/pkcs11/libopencryptoki.so",
    "/usr/lib64/pkcs11/libopencryptoki.so",
];

/// The openCryptoki module (`OPENCRYPTOKI_MODULE` overrides the search).
pub fn module_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("OPENCRYPTOKI_MODULE") {
        return Ok(PathBuf::from(p));
    }
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            Error::Setup(
                "openCryptoki is not installed (no libopencryptoki.so); run opencryptoki/setup.sh start"
                    .into(),
            )
        })
}

/// The state directory `opencryptoki/setup.sh` uses (`OPENCRYPTOKI_STATE`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/keybroker/opencryptoki`).
pub fn state_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("OPENCRYPTOKI_STATE") {
        return Ok(PathBuf::from(p));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| Error::Setup("neither XDG_CACHE_HOME nor HOME is set".into()))?;
    Ok(cache.join("keybroker").join("opencryptoki"))
}

/// A slot held by one test: the lock is released when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The slot id.
    pub slot: u64,
    /// Its token's label (set by setup.sh).
    pub label: String,
    _lock: Arc<File>,
}

/// Claims a free slot (waits up to `wait` for one).
pub fn claim(state: &Path, wait: Duration) -> Result<Claim> {
    let slots = fs::read_to_string(state.join("slots")).map_err(|e| {
        Error::Setup(format!(
            "{}: {e}; run opencryptoki/setup.sh start (it starts pkcsslotd and makes the slots)",
            state.join("slots").display()
        ))
    })?;
    let slots: Vec<(u64, String)> = slots
        .lines()
        .filter_map(|l| {
            let (id, label) = l.trim().split_once(' ')?;
            Some((id.parse().ok()?, label.to_string()))
        })
        .collect();
    let until = Instant::now() + wait;
    loop {
        for (slot, label) in &slots {
            let path = state.join("claims").join(format!("slot{slot}.lock"));
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err(format!("open {}", path.display())))?;
            if f.try_lock().is_ok() {
                return Ok(Claim {
                    slot: *slot,
                    label: label.clone(),
                    _lock: Arc::new(f),
                });
            }
        }
        if Instant::now() >= until {
            return Err(Error::Setup(format!(
                "all {} openCryptoki slots stayed claimed for {wait:?}",
                slots.len()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Empties the claimed slot's token with `hsm-probe clear` (every key and data object
/// destroyed); returns the user PIN setup.sh chose.
pub fn clear_token(hsm_probe: &Path, module: &Path, state: &Path, claim: &Claim) -> Result<String> {
    let pin = fs::read_to_string(state.join("user.pin"))
        .map_err(io_err(format!("read {}", state.join("user.pin").display())))?;
    let out = Command::new(hsm_probe)
        .arg("clear")
        .arg(module)
        .args([claim.label.as_str(), pin.trim()])
        .output()
        .map_err(io_err(format!("run {}", hsm_probe.display())))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "hsm-probe clear on openCryptoki slot {} failed: {} (is pkcsslotd running? \
             opencryptoki/setup.sh start)",
            claim.slot,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(pin.trim().to_string())
}
