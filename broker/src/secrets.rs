//! The secrets this process reads (the HSM user PIN, the SO PIN of `domain init`, the
//! PostgreSQL password) and keeping them out of other hands on the host.
//!
//! - **No stray copies.** A secret is read straight into a buffer that is wiped when dropped,
//!   sized once so it never reallocates (a reallocation would free the old block unwiped), and
//!   handed on as a [`SecretString`] (wiped on drop, redacted in `Debug`). What stays in memory
//!   is the one copy the HSM layer keeps for re-login (re-read from its source before each
//!   re-login and on SIGHUP), and — after the token refused a PIN — that refused value, wiped
//!   the same way, so that it is never tried again. An environment variable is copied out of
//!   the environment the same way, but the environment block itself cannot be wiped: prefer a
//!   file.
//! - **Private files only.** A PIN or password file that group or others may read, write or
//!   execute is refused before it is read, unless the configuration explicitly accepts it (then
//!   a warning at every start). The mode is taken from the open file, so a file swapped between
//!   the check and the read cannot slip through.
//! - **No core dumps.** [`disable_core_dumps`] is the first thing every `keybroker` command does.
//!
//! See docs/src/hardening.md.

use std::{io::Read, os::unix::fs::PermissionsExt, path::Path};

use secrecy::SecretString;
use zeroize::Zeroizing;

/// The largest PIN or password file accepted (PKCS #11 tokens take PINs of at most a few
/// hundred bytes).
pub const MAX_SECRET_FILE_BYTES: usize = 4096;

/// How a secret file's permissions are judged.
#[derive(Clone, Copy, Debug)]
pub struct FileRule<'a> {
    /// What the file is, in messages (`hsm.pin_file`, `--so-pin-file`, ...).
    pub what: &'a str,
    /// The option that accepts group or other permissions (`hsm.allow_insecure_pin_file_permissions`).
    pub option: &'a str,
    /// Whether that option is set.
    pub allow_insecure: bool,
}

/// Reads a secret from a file: its first line (trailing `\n`/`\r` removed), refused if group or
/// others have any permission on the file (see [`FileRule`]), if it is larger than
/// [`MAX_SECRET_FILE_BYTES`] or not UTF-8.
pub fn read_file(path: &Path, rule: FileRule<'_>) -> Result<SecretString, String> {
    let FileRule {
        what,
        option,
        allow_insecure,
    } = rule;
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let mode = f
        .metadata()
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        if !allow_insecure {
            return Err(format!(
                "{what} {} can be used by group or others (mode {:04o}): make it private to the broker's user (chmod 600), or, if another account must read it, set {option} = true",
                path.display(),
                mode & 0o7777
            ));
        }
        tracing::warn!(
            file = %path.display(),
            mode = %format!("{:04o}", mode & 0o7777),
            "WARNING: {what} can be used by group or others; accepted only because {option} = true"
        );
    }
    // One allocation, never grown: no unwiped copy is left behind by a reallocation.
    let mut buf = Zeroizing::new(vec![0u8; MAX_SECRET_FILE_BYTES + 1]);
    let mut n = 0;
    loop {
        let r = f
            .read(&mut buf[n..])
            .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
        if r == 0 {
            break;
        }
        n += r;
        if n > MAX_SECRET_FILE_BYTES {
            return Err(format!(
                "{what} {} is larger than {MAX_SECRET_FILE_BYTES} bytes: not a PIN or password file",
                path.display()
            ));
        }
    }
    let mut end = n;
    while end > 0 && matches!(buf[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| format!("{what} {} is not UTF-8 text", path.display()))?;
    // `From<&str>` copies into an exact-size allocation that becomes the secret's box.
    Ok(SecretString::from(text))
}

/// Reads a secret from the environment variable `var` (`None` when it is not set). The copy
/// made here is wiped; the environment block itself stays as the process was started with it.
pub fn read_env(var: &str) -> Result<Option<SecretString>, String> {
    use std::os::unix::ffi::OsStringExt;
    let Some(v) = std::env::var_os(var) else {
        return Ok(None);
    };
    let bytes = Zeroizing::new(v.into_vec());
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("environment variable {var} is not UTF-8 text"))?;
    Ok(Some(SecretString::from(text)))
}

/// Keeps secrets out of core dumps: no core file (RLIMIT_CORE = 0, soft and hard) and not
/// dumpable (which also stops same-user processes from attaching with ptrace or reading
/// /proc/PID/mem). Every `keybroker` command calls it first: `serve`, `dev`, `check-config`,
/// `domain` and `audit` hold the PIN or read the audit trail, and client commands hold DEKs.
pub fn disable_core_dumps() -> Result<(), String> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let mut problems = Vec::new();
    if let Err(e) = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    ) {
        problems.push(format!("could not disable core dumps (RLIMIT_CORE): {e}"));
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        problems.push(format!("could not mark the process non-dumpable: {e}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const RULE: FileRule<'static> = FileRule {
        what: "hsm.pin_file",
        option: "hsm.allow_insecure_pin_file_permissions",
        allow_insecure: false,
    };

    fn file(dir: &Path, name: &str, content: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn a_private_file_gives_its_first_line_and_anything_else_is_refused_with_the_reason() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path();
        let ok = file(dir, "ok", b"1234\r\n", 0o600);
        assert_eq!(read_file(&ok, RULE).expect("read").expose_secret(), "1234");
        let ro = file(dir, "ro", b"1234", 0o400);
        assert_eq!(read_file(&ro, RULE).expect("read").expose_secret(), "1234");
        for (mode, shown) in [
            (0o644, "0644"),
            (0o640, "0640"),
            (0o604, "0604"),
            (0o610, "0610"),
        ] {
            let p = file(dir, &format!("m{mode:o}"), b"1234\n", mode);
            let e = read_file(&p, RULE).expect_err("refused");
            assert!(
                e.starts_with(&format!(
                    "hsm.pin_file {} can be used by group or others (mode {shown})",
                    p.display()
                )) && e.contains("set hsm.allow_insecure_pin_file_permissions = true"),
                "{e}"
            );
            let allowed = FileRule {
                allow_insecure: true,
                ..RULE
            };
            assert_eq!(
                read_file(&p, allowed).expect("allowed").expose_secret(),
                "1234"
            );
        }
        let big = file(dir, "big", &[b'1'; MAX_SECRET_FILE_BYTES + 1], 0o600);
        let e = read_file(&big, RULE).expect_err("too large");
        assert!(e.contains("larger than 4096 bytes"), "{e}");
        let exact = file(dir, "exact", &[b'1'; MAX_SECRET_FILE_BYTES], 0o600);
        assert_eq!(
            read_file(&exact, RULE)
                .expect("4096 bytes")
                .expose_secret()
                .len(),
            MAX_SECRET_FILE_BYTES
        );
        let bin = file(dir, "bin", &[0xff, 0xfe, b'\n'], 0o600);
        let e = read_file(&bin, RULE).expect_err("not UTF-8");
        assert!(e.contains("is not UTF-8 text"), "{e}");
        let e = read_file(&dir.join("missing"), RULE).expect_err("missing");
        assert!(e.starts_with("cannot read hsm.pin_file"), "{e}");
    }

    #[test]
    fn an_unset_environment_variable_is_none() {
        assert!(
            read_env("KEYBROKER_TEST_SURELY_UNSET_7f3a")
                .expect("not an error")
                .is_none()
        );
    }
}
