//! The fault-injecting PKCS#11 module (`faultpkcs11`, C, built by `build.rs`): a shared library
//! that exports `C_GetFunctionList`, forwards every call to a real module (SoftHSM2 or
//! Kryoptic) and, on command, injects the faults a real HSM has and a soft token never shows —
//! `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_SESSION_HANDLE_INVALID`,
//! `CKR_SESSION_CLOSED`, `CKR_DEVICE_ERROR`, `CKR_FUNCTION_FAILED`, ... — at call N, with
//! probability p or in a time window, plus latency and hangs. The broker loads it exactly as a
//! vendor module (`[hsm] module = ...`). The rule language is documented at the top of
//! `faultpkcs11/faultpkcs11.c`; [`Rule`] writes it.
//!
//! The module reads three environment variables: the real module, the control file (re-read
//! whenever it changes, so rules can change while the broker runs) and a log file that gets one
//! line per injected fault (so a test can wait for a fault to have happened, and the soak run
//! can count them).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use crate::{Error, Result, io_err};

/// The built `libfaultpkcs11.so`.
pub fn module_path() -> PathBuf {
    PathBuf::from(env!("FAULTPKCS11_PATH"))
}

/// One rule of the control file.
#[derive(Clone, Debug)]
pub struct Rule {
    kind: &'static str,
    functions: String,
    rv: Option<String>,
    ms: Option<u64>,
    at: Option<u64>,
    count: Option<u64>,
    p: Option<f64>,
    after_ms: Option<u64>,
    for_ms: Option<u64>,
    latch: bool,
    slot: Option<u64>,
    value: Option<String>,
}

impl Rule {
    fn new(kind: &'static str, functions: &str) -> Self {
        Self {
            kind,
            functions: functions.into(),
            rv: None,
            ms: None,
            at: None,
            count: None,
            p: None,
            after_ms: None,
            for_ms: None,
            latch: false,
            slot: None,
            value: None,
        }
    }

    /// `functions` (comma-separated PKCS#11 names, or `*`) fail with `rv` (a `CKR_` name).
    pub fn fail(functions: &str, rv: &str) -> Self {
        let mut r = Self::new("fail", functions);
        r.rv = Some(rv.into());
        r
    }

    /// `functions` take `ms` longer.
    pub fn delay(functions: &str, ms: u64) -> Self {
        let mut r = Self::new("delay", functions);
        r.ms = Some(ms);
        r
    }

    /// `functions` block until the control file changes.
    pub fn hang(functions: &str) -> Self {
        Self::new("hang", functions)
    }

    /// Each call of `functions` is logged.
    pub fn trace(functions: &str) -> Self {
        Self::new("trace", functions)
    }

    /// `C_GetTokenInfo` answers as the real module does, except that it claims a clock
    /// (`CKF_CLOCK_ON_TOKEN`) whose `utcTime` holds `value` blank-padded (at most 16 bytes) —
    /// `"15:10:01"` is what openCryptoki 3.8.1 writes instead of `YYYYMMDDhhmmss00`. Combine
    /// with [`Rule::slot`] to corrupt one slot only.
    pub fn clock(value: &str) -> Self {
        let mut r = Self::new("clock", "C_GetTokenInfo");
        r.value = Some(value.into());
        r
    }

    /// `C_FindObjects` is forwarded, but its answer reports no objects found: every search
    /// finds nothing, as on a token whose storage is gone (SoftHSM2 with its token directory
    /// moved away). With [`Rule::fail`] on the crypto inits (`CKR_KEY_HANDLE_INVALID`), the
    /// symptom of a storage loss on a token that does not show one (Kryoptic serves from its
    /// open sqlite file).
    pub fn empty() -> Self {
        Self::new("empty", "C_FindObjects")
    }

    /// Only calls about slot `id` (for functions whose first argument is a slot id).
    pub fn slot(mut self, id: u64) -> Self {
        self.slot = Some(id);
        self
    }

    /// From the `n`th matching call (1-based) after the rules were loaded.
    pub fn at(mut self, n: u64) -> Self {
        self.at = Some(n);
        self
    }

    /// At most `n` times.
    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }

    /// Each eligible call with probability `p`.
    pub fn p(mut self, p: f64) -> Self {
        self.p = Some(p);
        self
    }

    /// Only in the window [after, after + for) ms after the rules were loaded.
    pub fn window(mut self, after_ms: u64, for_ms: u64) -> Self {
        self.after_ms = Some(after_ms);
        self.for_ms = Some(for_ms);
        self
    }

    /// For a hang: at most `ms`.
    pub fn ms(mut self, ms: u64) -> Self {
        self.ms = Some(ms);
        self
    }

    /// Once fired, every call fails with this rule's code until the application calls
    /// `C_Finalize` and a successful `C_Initialize` (a removed device that needs the library
    /// re-initialised).
    pub fn latch(mut self) -> Self {
        self.latch = true;
        self
    }

    /// The control-file line.
    pub fn line(&self) -> String {
        let mut l = if self.kind == "clock" {
            "clock".to_string()
        } else {
            format!("{} fn={}", self.kind, self.functions)
        };
        if let Some(rv) = &self.rv {
            let _ = write!(l, " rv={rv}");
        }
        for (k, v) in [
            ("ms", self.ms),
            ("at", self.at),
            ("count", self.count),
            ("after_ms", self.after_ms),
            ("for_ms", self.for_ms),
            ("slot", self.slot),
        ] {
            if let Some(v) = v {
                let _ = write!(l, " {k}={v}");
            }
        }
        if let Some(p) = self.p {
            let _ = write!(l, " p={p}");
        }
        if let Some(v) = &self.value {
            let _ = write!(l, " value={v}");
        }
        if self.latch {
            l.push_str(" latch");
        }
        l
    }
}

/// One line of the fault log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Unix time, ms.
    pub at_ms: u64,
    /// The process.
    pub pid: u32,
    /// `fail`, `latched`, `delay`, `hang`, `trace`, `clock`, `empty` or `error` (a bad
    /// control-file line).
    pub kind: String,
    /// The PKCS#11 function.
    pub function: String,
    /// The return value, the delay, or `call`.
    pub detail: String,
}

/// The fault module's files for one token: control file and log, in a directory.
#[derive(Clone, Debug)]
pub struct FaultControl {
    /// The real module calls are forwarded to.
    pub real_module: PathBuf,
    /// The control file.
    pub control: PathBuf,
    /// The log.
    pub log: PathBuf,
}

impl FaultControl {
    /// Files in `dir` for forwarding to `real_module`; no rules yet.
    pub fn new(dir: &Path, real_module: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        let module = module_path();
        if !module.exists() {
            return Err(Error::Setup(format!(
                "the fault module {} was not built",
                module.display()
            )));
        }
        Ok(Self {
            real_module: real_module.to_path_buf(),
            control: dir.join("faults.conf"),
            log: dir.join("faults.log"),
        })
    }

    /// The module to configure as `[hsm] module`.
    pub fn module(&self) -> PathBuf {
        module_path()
    }

    /// The environment the process that loads the module needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "FAULTY_PKCS11_MODULE".into(),
                self.real_module.display().to_string(),
            ),
            (
                "FAULTY_PKCS11_CONTROL".into(),
                self.control.display().to_string(),
            ),
            ("FAULTY_PKCS11_LOG".into(), self.log.display().to_string()),
        ]
    }

    /// Replaces the rules (atomically: write and rename; the module sees the change at its next
    /// call, and every change restarts the rules' counters and windows).
    pub fn set(&self, rules: &[Rule]) -> Result<()> {
        let mut text = String::from("# written by hsm_fixtures::fault\n");
        for r in rules {
            text.push_str(&r.line());
            text.push('\n');
        }
        let tmp = self.control.with_extension("tmp");
        fs::write(&tmp, text).map_err(io_err(format!("write {}", tmp.display())))?;
        fs::rename(&tmp, &self.control)
            .map_err(io_err(format!("rename to {}", self.control.display())))
    }

    /// Removes every rule.
    pub fn clear(&self) -> Result<()> {
        self.set(&[])
    }

    /// Every event logged so far.
    pub fn events(&self) -> Vec<Event> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.splitn(5, ' ');
                Some(Event {
                    at_ms: it.next()?.parse().ok()?,
                    pid: it.next()?.parse().ok()?,
                    kind: it.next()?.to_string(),
                    function: it.next()?.to_string(),
                    detail: it.next().unwrap_or("").to_string(),
                })
            })
            .collect()
    }

    /// How many events of `kind` (for `function`, if given) were logged.
    pub fn count(&self, kind: &str, function: Option<&str>) -> usize {
        self.events()
            .iter()
            .filter(|e| e.kind == kind && function.is_none_or(|f| e.function == f))
            .count()
    }

    /// Faults injected so far (failed calls, latched failures, delays, hangs, clocks and empty
    /// searches).
    pub fn injected(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| {
                matches!(
                    e.kind.as_str(),
                    "fail" | "latched" | "delay" | "hang" | "clock" | "empty"
                )
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_in_the_control_file_language() {
        assert_eq!(
            Rule::fail("C_EncryptInit", "CKR_SESSION_HANDLE_INVALID")
                .at(2)
                .count(1)
                .line(),
            "fail fn=C_EncryptInit rv=CKR_SESSION_HANDLE_INVALID at=2 count=1"
        );
        assert_eq!(
            Rule::fail("*", "CKR_DEVICE_REMOVED").latch().line(),
            "fail fn=* rv=CKR_DEVICE_REMOVED latch"
        );
        assert_eq!(
            Rule::delay("C_Decrypt", 50).p(0.5).window(0, 1000).line(),
            "delay fn=C_Decrypt ms=50 after_ms=0 for_ms=1000 p=0.5"
        );
        assert_eq!(Rule::hang("C_Sign").line(), "hang fn=C_Sign");
        assert_eq!(Rule::empty().line(), "empty fn=C_FindObjects");
        assert_eq!(
            Rule::empty().window(0, 500).line(),
            "empty fn=C_FindObjects after_ms=0 for_ms=500"
        );
        assert_eq!(
            Rule::clock("15:10:01").slot(3).line(),
            "clock slot=3 value=15:10:01"
        );
        assert_eq!(
            Rule::fail("C_GetTokenInfo", "CKR_DEVICE_ERROR")
                .slot(7)
                .line(),
            "fail fn=C_GetTokenInfo rv=CKR_DEVICE_ERROR slot=7"
        );
    }

    #[test]
    fn the_module_was_built() {
        assert!(module_path().exists(), "{}", module_path().display());
    }
}
