//! Secrets and files on the broker's own host: PIN and password files that other accounts can
//! read are refused unless explicitly allowed; the audit log, the SQLite store and their lock
//! files are private (0600) whatever the umask; every command that reads a PIN or the audit
//! log runs without core dumps. See docs/src/hardening.md.

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use keybroker_proto::v1 as pb;

use crate::common::*;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `keybroker ARGS` with the env's token; returns (success, stdout, stderr).
fn keybroker(env: &Env, args: &[&str], extra_env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(BROKER)
        .args(args)
        .envs(env.broker_env())
        .envs(extra_env.iter().copied())
        .env("RUST_LOG", "warn,cryptoki=off")
        .output()
        .expect("run keybroker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_pin_file_that_group_or_others_can_read_is_refused_unless_explicitly_allowed() {
    crate::require_aes!();
    let env = Env::new();
    chmod(&env.token.pin_file, 0o644);
    let e = env
        .try_start()
        .await
        .err()
        .expect("a world-readable PIN file is refused");
    let pin_file = env.token.pin_file.display().to_string();
    assert!(
        e.contains(&format!("hsm.pin_file {pin_file}"))
            && e.contains("mode 0644")
            && e.contains("hsm.allow_insecure_pin_file_permissions = true"),
        "says which file, its mode and the override: {e}"
    );
    assert!(
        !env.audit_log().exists() && !env.dir.path().join("keybroker.db").exists(),
        "refused before the store or the audit log was created"
    );
    let e = env.check_config().expect_err("check-config refuses it too");
    assert!(e.contains("mode 0644"), "{e}");

    // The SO PIN file of `domain init` is held to the same rule, and nothing is created.
    let so_pin = env.dir.path().join("so-0640.pin");
    std::fs::write(&so_pin, format!("{}\n", env.token.so_pin)).expect("write the SO PIN");
    chmod(&so_pin, 0o640);
    chmod(&env.token.pin_file, 0o600);
    let config = env.config.display().to_string();
    let so_arg = so_pin.display().to_string();
    let (ok, _, stderr) = keybroker(
        &env,
        &[
            "domain",
            "init",
            "--config",
            &config,
            "--so-pin-file",
            &so_arg,
        ],
        &[],
    );
    assert!(
        !ok && stderr.contains(&format!("--so-pin-file {so_arg}")) && stderr.contains("mode 0640"),
        "{stderr}"
    );
    let (ok, shown, stderr) = keybroker(&env, &["domain", "show", "--config", &config], &[]);
    assert!(ok, "{stderr}");
    assert!(
        shown.contains("\"domain_id\":null"),
        "no domain was made: {shown}"
    );

    // The explicit override: served, with a warning at every start.
    chmod(&env.token.pin_file, 0o640);
    env.edit_config(|t| {
        t.replace(
            "[hsm]\n",
            "[hsm]\nallow_insecure_pin_file_permissions = true\n",
        )
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    drop(c);
    let log = b.stop().await;
    assert!(
        log.contains("WARN") && log.contains("hsm.allow_insecure_pin_file_permissions"),
        "{log}"
    );
}

#[tokio::test]
async fn the_audit_log_the_store_and_their_lock_files_are_private_whatever_the_umask() {
    crate::require_aes!();
    // The broker runs under umask 022 (files 0644 unless it asks otherwise).
    let env = Env::with(Options {
        wrapper: vec![
            "sh".into(),
            "-c".into(),
            "umask 022 && exec \"$@\"".into(),
            "sh".into(),
        ],
        ..Default::default()
    });
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "t/k",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dir = env.dir.path();
    let mut files: Vec<PathBuf> = [
        "audit.log",
        "audit.log.lock",
        "keybroker.db",
        "keybroker.db.lock",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    // SQLite's WAL files, while the store is open, take the database file's mode.
    for f in ["keybroker.db-wal", "keybroker.db-shm"] {
        if dir.join(f).exists() {
            files.push(dir.join(f));
        }
    }
    let modes: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.display().to_string(), format!("{:04o}", mode(f))))
        .collect();
    drop(c);
    b.stop().await;
    for (f, m) in &modes {
        assert_eq!(m, "0600", "{f}: {modes:?}");
    }
}

/// The core-file limits of `pid`, as /proc shows them: (soft, hard).
fn core_limits(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc/PID/limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core file size line");
    let mut f = line["Max core file size".len()..].split_whitespace();
    (
        f.next().unwrap_or_default().to_string(),
        f.next().unwrap_or_default().to_string(),
    )
}

/// Runs `keybroker ARGS` (core files allowed by its parent, up to the hard limit) until it opens `fifo` to read a
/// secret or a log from it, reads its core-file limits there, then feeds it `feed` and waits
/// for it. Returns the limits seen and the command's (success, stdout + stderr).
fn limits_while_reading(
    env: &Env,
    args: &[&str],
    fifo: &Path,
    feed: &[u8],
) -> ((String, String), (bool, String)) {
    let _ = std::fs::remove_file(fifo);
    let st = std::process::Command::new("mkfifo")
        .arg("-m")
        .arg("600")
        .arg(fifo)
        .status()
        .expect("mkfifo");
    assert!(st.success(), "mkfifo");
    // Soft limit raised to the hard one: no privilege needed (the caller checked it is not 0).
    let (_, hard) = core_limits(std::process::id());
    let child = std::process::Command::new("prlimit")
        .arg(format!("--core={hard}"))
        .args(["--", BROKER])
        .args(args)
        .envs(env.broker_env())
        .env("RUST_LOG", "warn,cryptoki=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keybroker under prlimit");
    let pid = child.id();
    // Opening a FIFO to write blocks until the command opens it to read: then it is past its
    // start-up and waiting for the secret.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::OpenOptions::new().write(true).open(&path));
    });
    let started = Instant::now();
    let mut child = child;
    let mut writer = loop {
        if let Ok(w) = rx.recv_timeout(Duration::from_millis(20)) {
            break w.expect("open the FIFO to write");
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Unblock the opener before failing.
            let _ = std::fs::File::open(fifo);
            let out = child.wait_with_output().expect("output");
            panic!(
                "keybroker {args:?} exited ({status}) before reading {}: {}",
                fifo.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "keybroker {args:?} never opened {}",
            fifo.display()
        );
    };
    let limits = core_limits(pid);
    writer.write_all(feed).expect("feed the FIFO");
    drop(writer);
    let out = child.wait_with_output().expect("wait");
    (
        limits,
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
    )
}

#[tokio::test]
async fn commands_that_read_the_pin_or_the_audit_log_run_without_core_dumps() {
    let test = "commands_that_read_the_pin_or_the_audit_log_run_without_core_dumps";
    if core_limits(std::process::id()).1 == "0" {
        skip(
            test,
            "the hard core-file limit here is 0: a command that keeps it cannot be told from one that sets it",
        );
        return;
    }
    let env = Env::new();
    // The commands below read the PIN from a FIFO, so they can be caught waiting for it.
    let fifo = env.dir.path().join("pin.fifo");
    env.edit_config(|t| {
        t.replace(
            &format!("pin_file = \"{}\"", env.token.pin_file.display()),
            &format!("pin_file = \"{}\"", fifo.display()),
        )
    });
    assert!(
        std::fs::read_to_string(&env.config)
            .expect("config")
            .contains(&fifo.display().to_string()),
        "the config reads the PIN from the FIFO"
    );
    let config = env.config.display().to_string();
    let pin = format!("{}\n", env.token.user_pin);
    let log_fifo = env.dir.path().join("audit.fifo");
    let log_arg = log_fifo.display().to_string();
    let mut seen = Vec::new();
    for (args, fifo, feed, expect) in [
        (
            vec!["check-config", "--config", &config],
            &fifo,
            pin.as_bytes(),
            "configuration OK",
        ),
        (
            vec!["domain", "show", "--config", &config],
            &fifo,
            pin.as_bytes(),
            "domain_id",
        ),
        (
            vec!["audit", "verify", &log_arg],
            &log_fifo,
            &b""[..],
            "audit log OK",
        ),
    ] {
        let (limits, (ok, out)) = limits_while_reading(&env, &args, fifo, feed);
        assert!(ok && out.contains(expect), "{args:?}: {out}");
        seen.push((args[..2].join(" "), limits));
    }
    // RLIMIT_CORE (soft, hard) of each command while it held the secret.
    assert!(
        seen.iter().all(|(_, l)| l.0 == "0" && l.1 == "0"),
        "{seen:?}"
    );
}
