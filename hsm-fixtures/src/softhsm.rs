//! SoftHSM2 tokens in private directories.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, at `C_Initialize`, per process: a token made here is
//! used by a *child process* (the broker, or `hsm-probe`) started with [`SoftHsmToken::env`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result, io_err};

/// Where Debian, Ubuntu, Fedora and source builds put the SoftHSM2 module.
pub const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM2 PKCS#11 module on this machine (`SOFTHSM2_MODULE` overrides the search).
pub fn module_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        return Ok(PathBuf::from(p));
    }
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            Error::Setup(
                "SoftHSM2 is not installed (no libsofthsm2.so found); run softhsm/install.sh"
                    .into(),
            )
        })
}

/// A SoftHSM2 token that lives in its own directory.
#[derive(Clone)]
pub struct SoftHsmToken {
    /// The directory holding `softhsm2.conf`, `tokens/` and the PIN files.
    pub dir: PathBuf,
    /// The `softhsm2.conf` to export as `SOFTHSM2_CONF`.
    pub conf: PathBuf,
    /// The token label.
    pub label: String,
    /// The user PIN.
    pub user_pin: String,
    /// The security officer PIN.
    pub so_pin: String,
    /// The file holding the user PIN (mode 0600), for `pin_file` in a broker config.
    pub pin_file: PathBuf,
    /// The PKCS#11 module.
    pub module: PathBuf,
}

impl std::fmt::Debug for SoftHsmToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftHsmToken")
            .field("dir", &self.dir)
            .field("label", &self.label)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl SoftHsmToken {
    /// Creates `dir` (if needed), writes a `softhsm2.conf` for it and initialises a token with
    /// `label` and random PINs using `softhsm2-util`.
    pub fn create(dir: &Path, label: &str) -> Result<Self> {
        let module = module_path()?;
        let tokens = dir.join("tokens");
        fs::create_dir_all(&tokens).map_err(io_err(format!("create {}", tokens.display())))?;
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "# Written by hsm-fixtures: a private SoftHSM2 configuration.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokens.display()
        );
        fs::write(&conf, text).map_err(io_err(format!("write {}", conf.display())))?;
        let user_pin = random_pin()?;
        let so_pin = random_pin()?;
        let out = Command::new(softhsm2_util())
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", &so_pin, "--pin", &user_pin])
            .output()
            .map_err(io_err(
                "run softhsm2-util (install it with softhsm/install.sh)",
            ))?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "softhsm2-util --init-token failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let pin_file = dir.join("user.pin");
        write_private(&pin_file, &user_pin)?;
        write_private(&dir.join("so.pin"), &so_pin)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            conf,
            label: label.into(),
            user_pin,
            so_pin,
            pin_file,
            module,
        })
    }

    /// Re-opens a token made earlier by [`SoftHsmToken::create`] in `dir`.
    pub fn open(dir: &Path, label: &str) -> Result<Self> {
        let read = |p: PathBuf| {
            fs::read_to_string(&p)
                .map(|s| s.trim().to_string())
                .map_err(io_err(format!("read {}", p.display())))
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            conf: dir.join("softhsm2.conf"),
            label: label.into(),
            user_pin: read(dir.join("user.pin"))?,
            so_pin: read(dir.join("so.pin"))?,
            pin_file: dir.join("user.pin"),
            module: module_path()?,
        })
    }

    /// The environment a process needs to see this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".into(), self.conf.display().to_string())]
    }
}

fn softhsm2_util() -> String {
    std::env::var("SOFTHSM2_UTIL").unwrap_or_else(|_| "softhsm2-util".into())
}

/// A random 24-hex-digit PIN.
pub fn random_pin() -> Result<String> {
    let mut b = [0u8; 12];
    let mut f = fs::File::open("/dev/urandom").map_err(io_err("open /dev/urandom"))?;
    std::io::Read::read_exact(&mut f, &mut b).map_err(io_err("read /dev/urandom"))?;
    Ok(hex::encode(b))
}

/// Writes a secret file readable only by its owner.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("write {}", path.display())))?;
    std::io::Write::write_all(&mut f, contents.as_bytes())
        .map_err(io_err(format!("write {}", path.display())))
}
