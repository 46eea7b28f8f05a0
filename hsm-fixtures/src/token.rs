//! A test token of any kind (SoftHSM2, Kryoptic or openCryptoki), behind one type, so the
//! end-to-end suite runs unchanged against each implementation
//! (`KEYBROKER_TEST_TOKEN=softhsm|kryoptic|opencryptoki`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::{Error, Result, io_err, kryoptic, opencryptoki, softhsm};

/// Which PKCS#11 implementation backs a test token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// SoftHSM2 2.6.1 (Debian package `softhsm2`).
    SoftHsm,
    /// Kryoptic (built from crates.io by `kryoptic/build.sh`).
    Kryoptic,
    /// openCryptoki 3.8.1's soft token (Debian package `opencryptoki`; slots made and the
    /// slot daemon started by `opencryptoki/setup.sh`). No AES-GCM and no AES key wrap.
    OpenCryptoki,
}

impl TokenKind {
    /// `KEYBROKER_TEST_TOKEN` (`softhsm`, the default, or `kryoptic`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("KEYBROKER_TEST_TOKEN").as_deref() {
            Err(_) | Ok("") | Ok("softhsm") | Ok("softhsm2") => Ok(TokenKind::SoftHsm),
            Ok("kryoptic") => Ok(TokenKind::Kryoptic),
            Ok("opencryptoki") => Ok(TokenKind::OpenCryptoki),
            Ok(other) => Err(Error::Setup(format!(
                "KEYBROKER_TEST_TOKEN={other:?}: expected \"softhsm\", \"kryoptic\" or \"opencryptoki\""
            ))),
        }
    }

    /// `softhsm`, `kryoptic` or `opencryptoki`.
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::SoftHsm => "softhsm",
            TokenKind::Kryoptic => "kryoptic",
            TokenKind::OpenCryptoki => "opencryptoki",
        }
    }

    /// The variable the module reads its configuration path from (openCryptoki has fixed
    /// paths: none).
    pub fn conf_var(self) -> Option<&'static str> {
        match self {
            TokenKind::SoftHsm => Some("SOFTHSM2_CONF"),
            TokenKind::Kryoptic => Some("KRYOPTIC_CONF"),
            TokenKind::OpenCryptoki => None,
        }
    }

    /// Whether the token has the AES mechanisms keybroker uses (AES-GCM and RFC 5649).
    pub fn has_aes(self) -> bool {
        self != TokenKind::OpenCryptoki
    }
}

/// A token in its own directory, of either kind.
#[derive(Clone)]
pub struct TestToken {
    /// Which implementation.
    pub kind: TokenKind,
    /// The directory holding the configuration, the token's storage and the PIN files.
    pub dir: PathBuf,
    /// The configuration file (`SOFTHSM2_CONF` or `KRYOPTIC_CONF`).
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
    /// openCryptoki: the slot this token holds (released when the last clone is dropped).
    pub claim: Option<opencryptoki::Claim>,
}

impl std::fmt::Debug for TestToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestToken")
            .field("kind", &self.kind)
            .field("dir", &self.dir)
            .field("label", &self.label)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl TestToken {
    /// Creates and initialises a token of `kind` in `dir`. `hsm_probe` is the `hsm-probe` tool
    /// (Kryoptic tokens are initialised through PKCS#11 by it; SoftHSM2 uses `softhsm2-util`).
    pub fn create(kind: TokenKind, dir: &Path, label: &str, hsm_probe: &Path) -> Result<Self> {
        match kind {
            TokenKind::SoftHsm => {
                let t = softhsm::SoftHsmToken::create(dir, label)?;
                Ok(Self {
                    kind,
                    dir: t.dir,
                    conf: t.conf,
                    label: t.label,
                    user_pin: t.user_pin,
                    so_pin: t.so_pin,
                    pin_file: t.pin_file,
                    module: t.module,
                    claim: None,
                })
            }
            TokenKind::Kryoptic => {
                let module = kryoptic::module_path()?;
                if !module.exists() {
                    return Err(Error::Setup(format!(
                        "the Kryoptic module {} is not built; run kryoptic/build.sh",
                        module.display()
                    )));
                }
                fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
                let conf = dir.join("kryoptic.conf");
                kryoptic::write_conf(&conf, &dir.join("token.sql"), None)?;
                let user_pin = softhsm::random_pin()?;
                let so_pin = softhsm::random_pin()?;
                kryoptic::init_token(hsm_probe, &module, &conf, label, &so_pin, &user_pin)?;
                let pin_file = dir.join("user.pin");
                softhsm::write_private(&pin_file, &user_pin)?;
                softhsm::write_private(&dir.join("so.pin"), &so_pin)?;
                Ok(Self {
                    kind,
                    dir: dir.to_path_buf(),
                    conf,
                    label: label.into(),
                    user_pin,
                    so_pin,
                    pin_file,
                    module,
                    claim: None,
                })
            }
            TokenKind::OpenCryptoki => {
                let module = opencryptoki::module_path()?;
                let state = opencryptoki::state_dir()?;
                fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
                // The label is the slot's (set by setup.sh), not `label`: see the module docs
                // of `opencryptoki` for why the token is emptied rather than re-initialised.
                let _ = label;
                let claim = opencryptoki::claim(&state, std::time::Duration::from_secs(120))?;
                let user_pin = opencryptoki::clear_token(hsm_probe, &module, &state, &claim)?;
                let so_pin = "87654321".to_string();
                let pin_file = dir.join("user.pin");
                softhsm::write_private(&pin_file, &user_pin)?;
                softhsm::write_private(&dir.join("so.pin"), &so_pin)?;
                Ok(Self {
                    kind,
                    dir: dir.to_path_buf(),
                    conf: state,
                    label: claim.label.clone(),
                    user_pin,
                    so_pin,
                    pin_file,
                    module,
                    claim: Some(claim),
                })
            }
        }
    }

    /// The environment a process needs to see this token.
    pub fn env(&self) -> Vec<(String, String)> {
        self.kind
            .conf_var()
            .map(|v| (v.into(), self.conf.display().to_string()))
            .into_iter()
            .collect()
    }

    /// Kryoptic only: rewrites the slot's `mechanisms` list (`None` removes it), e.g.
    /// `["DENY", "CKM_AES_GCM"]` to imitate an HSM without AES-GCM. Takes effect at the next
    /// process start. The token's objects are kept.
    pub fn set_mechanisms(&self, mechanisms: Option<&[&str]>) -> Result<()> {
        if self.kind != TokenKind::Kryoptic {
            return Err(Error::Setup(
                "only a Kryoptic slot can hide mechanisms".into(),
            ));
        }
        kryoptic::write_conf(&self.conf, &self.dir.join("token.sql"), mechanisms)
    }
}
