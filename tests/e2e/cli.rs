//! The `keybroker` command line for people: bulk operations with progress and a summary.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use keybroker_proto::v1 as pb;

use crate::common::*;

/// Runs a client command against `b` as the test client: (success, stdout, stderr).
pub(crate) async fn cli(env: &Env, b: &Broker, args: &[&str]) -> (bool, String, String) {
    cli_as(env, b, &env.pki.client, args).await
}

#[tokio::test]
async fn key_rewrap_all_moves_a_file_of_envelopes_to_the_newest_version_with_progress() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "acme/bulk",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    const N: usize = 40;
    let mut deks = Vec::new();
    let mut input = String::from("# envelopes of acme/bulk\n");
    for i in 0..N {
        let dek = random_dek(32);
        let aad = format!("item-{i}");
        let w = wrap(&mut c, "acme/bulk", &dek, aad.as_bytes())
            .await
            .expect("wrap");
        assert_eq!(w.key_version, 1);
        input.push_str(&format!("{}\t{aad}\n", B64.encode(&w.wrapped_key)));
        if i == 19 {
            input.push_str("not-base64!!\n");
        }
        deks.push((dek, aad));
    }
    c.mgmt
        .rotate_key(pb::RotateKeyRequest {
            key: "acme/bulk".into(),
        })
        .await
        .expect("rotate");
    let dir = env.dir.path();
    let (inp, outp) = (dir.join("envelopes.txt"), dir.join("rewrapped.txt"));
    std::fs::write(&inp, &input).expect("write input");

    let (ok, stdout, stderr) = cli(
        &env,
        &b,
        &[
            "key",
            "rewrap-all",
            "--input",
            inp.to_str().expect("path"),
            "--output-file",
            outp.to_str().expect("path"),
            "--concurrency",
            "8",
            "--progress",
            "always",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(
        !ok,
        "one line failed, so the command fails: {stdout}{stderr}"
    );
    let total = N + 2;
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    assert_eq!(summary["total"], total);
    assert_eq!(summary["rewrapped"], N);
    assert_eq!(summary["moved_to_newer_version"], N);
    assert_eq!(summary["skipped"], 1);
    assert_eq!(summary["failed"], 1);
    assert_eq!(
        summary["errors"],
        serde_json::json!([{"line": 22, "error": "not base64"}])
    );
    assert!(
        stderr.contains(&format!("rewrap-all: {total}/{total} (100%), 1 failed")),
        "the last progress line: {stderr}"
    );
    assert!(
        stderr.contains("1 of 42 envelopes could not be rewrapped"),
        "{stderr}"
    );

    // Line N of the output answers line N of the input.
    let text = std::fs::read_to_string(&outp).expect("output");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), total);
    assert_eq!((lines[0], lines[21]), ("", ""));
    let mut fixed = String::new();
    for (i, (dek, aad)) in deks.iter().enumerate() {
        let line = lines[if i < 20 { i + 1 } else { i + 2 }];
        let env_bytes = B64.decode(line).expect("base64 envelope");
        let u = unwrap(&mut c, "acme/bulk", &env_bytes, aad.as_bytes())
            .await
            .expect("the new envelope unwraps with the same AAD");
        assert_eq!((&u.plaintext, u.key_version), (dek, 2));
        fixed.push_str(&format!("{line}\t{aad}\n"));
    }

    // Everything already at the newest version: success, a table, no progress when asked not.
    std::fs::write(&inp, &fixed).expect("write input");
    let (ok, stdout, stderr) = cli(
        &env,
        &b,
        &[
            "key",
            "rewrap-all",
            "--input",
            inp.to_str().expect("path"),
            "--output-file",
            outp.to_str().expect("path"),
            "--progress",
            "never",
        ],
    )
    .await;
    assert!(ok, "{stdout}{stderr}");
    assert!(!stderr.contains("rewrap-all:"), "{stderr}");
    let rows: Vec<(&str, &str)> = stdout
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("row");
            (k.trim(), v.trim())
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("envelopes read", "40"),
            ("rewrapped", "40"),
            ("moved to a newer version", "0"),
            ("skipped (blank/comment)", "0"),
            ("failed", "0"),
        ]
    );

    // Admin commands: a table for people, one JSON document with -o json.
    let (ok, stdout, stderr) = cli(&env, &b, &["key", "get", "acme/bulk"]).await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["FIELD", "VALUE"]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["current", "version", "2"]),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("VERSION  ID")),
        "{stdout}"
    );
    let (ok, stdout, _) = cli(&env, &b, &["key", "get", "acme/bulk", "-o", "json"]).await;
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON document");
    assert_eq!(j["current_version"], 2);
    assert_eq!(j["versions"].as_array().map(Vec::len), Some(2));
    let (ok, stdout, stderr) = cli(
        &env,
        &b,
        &["audit", "query", "--key", "acme/bulk", "--limit", "3"],
    )
    .await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["SEQ", "TIME", "CALLER", "OP", "KEY", "VERSION", "OUTCOME"]
    );
    assert_eq!(lines.len(), 4, "{stdout}");
    // The key's creation: its intent (written before the key was made), then its outcome.
    assert!(
        lines[1].contains("acme/bulk") && lines[1].contains("INTENT"),
        "{stdout}"
    );
    assert!(
        lines[2].contains("acme/bulk") && lines[2].contains("OK"),
        "{stdout}"
    );
    b.stop().await;
}

/// `keybroker domain init|show`, `key backup`, `key purge`, `key restore` by hand, as the book (docs/src/lifecycle.md)
/// describes them; the envelope made before the backup unwraps after the restore.
#[tokio::test]
async fn backup_and_restore_through_the_command_line() {
    crate::require_aes!();
    let env = Env::with(Options {
        lifecycle_extra: "backup = true".into(),
        ..Default::default()
    });
    let domain = |args: &[&str], so_pin: Option<&str>| {
        let mut c = std::process::Command::new(BROKER);
        c.arg("domain")
            .args(args)
            .arg("--config")
            .arg(&env.config)
            .envs(env.token.env());
        if let Some(p) = so_pin {
            c.env("KEYBROKER_SO_PIN", p);
        }
        let out = c.output().expect("run keybroker domain");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, _) = domain(&["show"], None);
    assert!(ok && stdout.contains("\"domain_id\":null"), "{stdout}");
    let (ok, _, stderr) = domain(&["init"], Some("not-the-so-pin"));
    assert!(
        !ok && stderr.contains("security officer"),
        "wrong SO PIN: {stderr}"
    );
    let (ok, _, stderr) = domain(&["init"], None);
    assert!(
        !ok && stderr.contains("KEYBROKER_SO_PIN"),
        "no SO PIN: {stderr}"
    );
    let (ok, made, stderr) = domain(&["init"], Some(&env.token.so_pin));
    assert!(ok, "{stderr}");
    let made: serde_json::Value = serde_json::from_str(made.trim()).expect("JSON");
    let (ok, shown, _) = domain(&["show"], None);
    assert!(ok);
    let shown: serde_json::Value = serde_json::from_str(shown.trim()).expect("JSON");
    assert_eq!(made["domain_id"], shown["domain_id"]);

    let b = env.start().await;
    let (ok, _, stderr) = cli(
        &env,
        &b,
        &["key", "create", "acme/cli", "--type", "aes-256"],
    )
    .await;
    assert!(ok, "{stderr}");
    let dek = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let (ok, wrapped, stderr) = cli(
        &env,
        &b,
        &[
            "wrap",
            "acme/cli",
            "--plaintext-hex",
            dek,
            "--aad",
            "order-42",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let wrapped = wrapped.trim().to_string();
    let file = env.dir.path().join("acme-cli.kbbk");
    let file_s = file.display().to_string();
    let (ok, stdout, stderr) =
        cli(&env, &b, &["key", "backup", "acme/cli", "--out", &file_s]).await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(made["domain_id"].as_str().expect("id")),
        "{stdout}"
    );
    assert!(std::fs::read(&file).expect("blob").starts_with(b"KBBK"));
    for args in [["key", "delete", "acme/cli"], ["key", "purge", "acme/cli"]] {
        let (ok, _, stderr) = cli(&env, &b, &args).await;
        assert!(ok, "{args:?}: {stderr}");
    }
    let (ok, _, _) = cli(&env, &b, &["unwrap", &wrapped, "--aad", "order-42"]).await;
    assert!(!ok, "purged: must not unwrap");
    let (ok, stdout, stderr) = cli(&env, &b, &["key", "restore", &file_s]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("acme/cli"), "{stdout}");
    let (ok, stdout, stderr) = cli(&env, &b, &["unwrap", &wrapped, "--aad", "order-42"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains(dek), "{stdout}");
    let (ok, _, stderr) = cli(&env, &b, &["key", "restore", &file_s]).await;
    assert!(!ok && stderr.contains("AlreadyExists"), "{stderr}");
    b.stop().await;
}

/// `key create` sets a key's operations and tags at once: a payload key needs no second
/// command, and a misspelt operation is refused before anything is created.
#[tokio::test]
async fn key_create_sets_operations_and_tags() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let (ok, _, err) = cli(
        &env,
        &b,
        &[
            "key",
            "create",
            "acme/typo",
            "--operations",
            "encrypt,decrpyt",
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("unknown operation \"decrpyt\""), "{err}");
    let (ok, _, _) = cli(&env, &b, &["key", "get", "acme/typo"]).await;
    assert!(!ok, "a refused create made no key");

    let (ok, out, err) = cli(
        &env,
        &b,
        &[
            "key",
            "create",
            "acme/memo",
            "--operations",
            "encrypt,decrypt",
            "--tag",
            "team=notes",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(
        j["attributes"]["operations"],
        serde_json::json!(["encrypt", "decrypt"]),
        "{out}"
    );
    assert_eq!(j["attributes"]["tags"]["team"], "notes", "{out}");
    // It encrypts at once, and does only what it was made for.
    let (ok, out, err) = cli(
        &env,
        &b,
        &["encrypt", "acme/memo", "--plaintext", "x", "-o", "json"],
    )
    .await;
    assert!(ok, "{err}");
    let ct = serde_json::from_str::<serde_json::Value>(out.trim()).expect("json")["ciphertext"]
        .as_str()
        .map(str::to_string);
    assert!(ct.is_some(), "{out}");
    let (ok, _, err) = cli(
        &env,
        &b,
        &["wrap", "acme/memo", "--plaintext-hex", &"11".repeat(32)],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("does not allow wrap"), "{err}");
    b.stop().await;
}

#[tokio::test]
async fn encrypt_and_decrypt_from_the_command_line_as_a_table_and_as_json() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let (ok, _, err) = cli(
        &env,
        &b,
        &["key", "create", "acme/notes", "--type", "aes-256"],
    )
    .await;
    assert!(ok, "{err}");
    // A new key does not encrypt payloads until its operations say so.
    let (ok, _, err) = cli(&env, &b, &["encrypt", "acme/notes", "--plaintext", "x"]).await;
    assert!(!ok);
    assert!(err.contains("does not allow encrypt"), "{err}");
    let (ok, _, err) = cli(
        &env,
        &b,
        &[
            "key",
            "update",
            "acme/notes",
            "--operations",
            "encrypt,decrypt",
        ],
    )
    .await;
    assert!(ok, "{err}");

    // Table: a header and one row whose last cell is the ciphertext.
    let (ok, out, err) = cli(
        &env,
        &b,
        &[
            "encrypt",
            "acme/notes",
            "--plaintext",
            "meet at noon",
            "--aad",
            "memo-1",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("KEY"), "{out}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[..3], ["acme/notes", "1", "aes-256-gcm"], "{out}");
    let ct = row[3];
    assert_eq!(B64.decode(ct).expect("base64")[0], 0x02);

    // JSON, and the plaintext back.
    let (ok, out, err) = cli(&env, &b, &["decrypt", ct, "--aad", "memo-1", "-o", "json"]).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(j["key"], "acme/notes");
    assert_eq!(j["key_version"], 1);
    assert_eq!(
        B64.decode(j["plaintext_base64"].as_str().expect("plaintext"))
            .expect("base64"),
        b"meet at noon"
    );
    // --out writes the raw payload to a new private file.
    let out_file = env.dir.path().join("memo.txt");
    let (ok, _, err) = cli(
        &env,
        &b,
        &[
            "decrypt",
            ct,
            "--aad",
            "memo-1",
            "--out",
            out_file.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&out_file).expect("read"), b"meet at noon");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out_file)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A wrong AAD is the one unauthentic error.
    let (ok, _, err) = cli(&env, &b, &["decrypt", ct, "--aad", "memo-2"]).await;
    assert!(!ok);
    assert!(
        err.contains("ciphertext is malformed or not authentic"),
        "{err}"
    );
    b.stop().await;
}

/// `random` prints bytes from the HSM; tables and text (key get, delete, purge, hyok status)
/// show times as RFC 3339 ("never" for unset) while `-o json` keeps epoch milliseconds.
#[tokio::test]
async fn random_bytes_and_key_tables_with_readable_times_from_the_command_line() {
    crate::require_aes!();
    let env = Env::new();
    let b = env.start().await;
    let (ok, out, err) = cli(&env, &b, &["random", "16", "--hex"]).await;
    assert!(ok, "{err}");
    let hex = out.trim();
    assert!(
        hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{out}"
    );
    let (ok, out, err) = cli(&env, &b, &["random", "24", "-o", "json"]).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["count"], 24);
    let (ok, _, err) = cli(&env, &b, &["random", "0"]).await;
    assert!(!ok && err.contains("count must be 1 to 4096"), "{err}");

    let (ok, _, err) = cli(&env, &b, &["key", "create", "acme/k", "--type", "aes-256"]).await;
    assert!(ok, "{err}");
    let (ok, table, err) = cli(&env, &b, &["key", "get", "acme/k"]).await;
    assert!(ok, "{err}");
    let created = table
        .lines()
        .find(|l| l.starts_with("created"))
        .unwrap_or_else(|| panic!("no created row: {table}"));
    let year = time::OffsetDateTime::now_utc().year().to_string();
    assert!(
        created.contains(&year) && created.contains('T') && created.ends_with('Z'),
        "{created}"
    );
    assert!(!table.contains("(ms)"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("expires") && l.ends_with("never")),
        "{table}"
    );
    let (ok, out, err) = cli(&env, &b, &["key", "get", "acme/k", "-o", "json"]).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        j["created_at_ms"].as_i64().is_some_and(|ms| ms > 0),
        "{out}"
    );

    // Delete, purge and the HYOK switch's state: RFC 3339 in text, epoch ms in JSON only.
    let rfc3339 = |out: &str| {
        out.contains(&year) && out.contains('T') && out.contains('Z') && !out.contains(" ms")
    };
    let (ok, _, err) = cli(&env, &b, &["key", "create", "acme/k2", "--type", "aes-256"]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&env, &b, &["key", "delete", "acme/k"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("deleted at ") && out.contains("scheduled purge at ") && rfc3339(&out),
        "{out}"
    );
    let (ok, out, err) = cli(&env, &b, &["key", "delete", "acme/k2", "-o", "json"]).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["name"], "acme/k2", "{out}");
    assert!(
        j["scheduled_purge_ms"].as_i64().is_some_and(|ms| ms > 0)
            && j["deleted_at_ms"].as_i64().is_some_and(|ms| ms > 0),
        "{out}"
    );
    let (ok, out, err) = cli(&env, &b, &["key", "purge", "acme/k"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("purged acme/k at ") && rfc3339(&out) && !out.contains("purged_at_ms"),
        "{out}"
    );
    let (ok, out, err) = cli(&env, &b, &["key", "purge", "acme/k2", "-o", "json"]).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(j["purged_at_ms"].as_i64().is_some_and(|ms| ms > 0), "{out}");
    let (ok, out, err) = cli(&env, &b, &["hyok", "status"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("CONNECTED  (changed ") && rfc3339(&out) && !out.contains("changed_at_ms"),
        "{out}"
    );
    let (ok, out, err) = cli(&env, &b, &["hyok", "status", "-o", "json"]).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        j["changed_at_ms"].as_i64().is_some_and(|ms| ms > 0),
        "{out}"
    );
    b.stop().await;
}

#[tokio::test]
async fn sign_and_verify_from_the_command_line_with_tables_and_json() {
    let env = Env::new();
    let b = env.start().await;
    let (ok, out, err) = cli(
        &env,
        &b,
        &["key", "create", "acme/sig", "--type", "ec-p256"],
    )
    .await;
    if !ok && err.contains("cannot") {
        skip_unsupported(
            "cli::sign_and_verify_from_the_command_line_with_tables_and_json",
            "EC_P256",
            &format!("the token cannot make ec-p256 keys: {err}"),
        );
        return b.stop().await.truncate(0);
    }
    assert!(ok, "{err}");
    assert!(out.contains("ec-p256") && out.contains("ecdsa"), "{out}");
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(b"signed from the CLI"));
    let (ok, out, err) = cli(
        &env,
        &b,
        &[
            "sign",
            "acme/sig",
            "--alg",
            "ES256",
            "--digest-hex",
            &digest,
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (&j["algorithm"], &j["key_version"]),
        (&"ES256".into(), &1.into()),
        "{out}"
    );
    let sig = j["signature"].as_str().expect("signature").to_string();
    assert_eq!(
        j["signature_hex"].as_str().map(str::len),
        Some(128),
        "{out}"
    );
    // The table form.
    let (ok, table, err) = cli(
        &env,
        &b,
        &[
            "sign",
            "acme/sig",
            "--alg",
            "es256",
            "--digest-hex",
            &digest,
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        table.contains("SIGNATURE") && table.contains("ES256"),
        "{table}"
    );
    let verify = |sig: String| {
        let digest = digest.clone();
        let (env, b) = (&env, &b);
        async move {
            cli(
                env,
                b,
                &[
                    "verify",
                    "acme/sig",
                    "--alg",
                    "ES256",
                    "--digest-hex",
                    &digest,
                    "--signature",
                    &sig,
                    "-o",
                    "json",
                ],
            )
            .await
        }
    };
    let (ok, out, err) = verify(sig.clone()).await;
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["valid"], true, "{out}");
    // An altered signature: valid false, and exit status 1.
    let mut raw = hex::decode(j_hex(&sig)).expect("hex");
    raw[0] ^= 1;
    let (ok, out, _) = verify(hex::encode(&raw)).await;
    assert!(!ok);
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(j["valid"], false, "{out}");
    // A digest of the wrong length: the broker's message.
    let (ok, _, err) = cli(
        &env,
        &b,
        &["sign", "acme/sig", "--alg", "ES256", "--digest-hex", "abcd"],
    )
    .await;
    assert!(!ok && err.contains("digest is 2 bytes"), "{err}");
    b.stop().await;
}

/// base64 → hex (the JSON's signature is base64).
fn j_hex(b64: &str) -> String {
    hex::encode(B64.decode(b64).expect("base64"))
}
