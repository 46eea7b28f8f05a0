//! Client subcommands and `check-config`.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use keybroker_proto::v1 as pb;
use serde_json::json;

use super::{AuditCommand, Command, ConnArgs, HyokCommand, KeyCommand, Output, status};
use crate::{
    client::{ClientSettings, clients},
    config::Config,
    model::{Algorithm, Dek, KeyType},
};

/// `keybroker domain init` (with an SO PIN source) or `keybroker domain show` (without).
pub async fn domain(
    cfg: &Config,
    so_pin_file: Option<Option<std::path::PathBuf>>,
) -> Result<(), String> {
    let hsm = crate::server::open_hsm(cfg).await?;
    let Some(so_pin_file) = so_pin_file else {
        let id = hsm.domain_id().await.map_err(|e| e.to_string())?;
        println!(
            "{}",
            match id {
                Ok(id) => json!({"domain_id": id.hex()}),
                Err(why) => json!({"domain_id": null, "why": why}),
            }
        );
        return Ok(());
    };
    let pin = match so_pin_file {
        Some(p) => crate::secrets::read_file(&p, cfg.pin_file_rule("--so-pin-file"))?,
        None => crate::secrets::read_env("KEYBROKER_SO_PIN")?
            .ok_or("give the SO PIN with --so-pin-file or KEYBROKER_SO_PIN")?,
    };
    let report = tokio::task::spawn_blocking(move || hsm.init_domain(&pin))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        json!({"domain_id": report.id.hex(), "kwp_mechanism": report.kwp_mechanism,
            "created": report.created})
    );
    Ok(())
}

/// Probes the configured HSM and prints what it found: the token, every slot, and the
/// capability report — also when the token is refused (then the refusal follows on stderr and
/// the exit status is 1), so a deployer sees what works before deciding.
pub async fn check_config(cfg: &Config, output: Output) -> Result<(), String> {
    // What `serve` refuses before it opens anything, by the same code.
    crate::server::validate(cfg)?;
    for (what, p) in [
        ("tls.cert", &cfg.tls.cert),
        ("tls.key", &cfg.tls.key),
        ("tls.client_ca", &cfg.tls.client_ca),
    ] {
        let p = cfg.path(p);
        if !p.exists() {
            return Err(format!("{what}: {} does not exist", p.display()));
        }
    }
    crate::tls::Reloadable::load(cfg.tls_paths())?;
    // [xks]: its TLS files and every prefix's SigV4 credentials load (secrets are not printed,
    // only the access key ids in force).
    let xks = match &cfg.xks {
        None => None,
        Some(x) => {
            let c = crate::api::xks::door::check(x, &|p| cfg.path(p))?;
            Some(json!({
                "listen": x.listen,
                "mtls": c.mtls,
                "prefixes": c.prefixes.iter().map(|(uri_path, ids)| json!({
                    "uri_path": uri_path, "access_key_ids": ids,
                })).collect::<Vec<_>>(),
            }))
        }
    };
    // [ekm]: its TLS files (server certificate, client CA) load.
    let ekm = match &cfg.ekm {
        None => None,
        Some(x) => {
            let prefixes = crate::api::ekm::door::check(x, &|p| cfg.path(p))?;
            Some(json!({
                "listen": x.listen,
                "client_cn": x.client_cn,
                "prefixes": prefixes,
            }))
        }
    };
    // [[external_proxy]]: URLs parse, TLS files (CA, client certificate and key) load.
    let external = crate::external::check(&cfg.external_proxy, &|p| cfg.path(p))?;
    let store = probe_store(cfg).await?;
    let hsm = crate::server::open_hsm_unchecked(cfg).await?;
    let uri = cfg.hsm_uri()?.map(|u| {
        json!({
            "selector": cfg.hsm_settings(secrecy::SecretString::from(String::new())).token,
            "ignored_query_attributes": u.ignored,
        })
    });
    let caps = crate::server::capability_report(cfg, &hsm);
    let refusal = crate::server::refusal(cfg, &hsm);
    match output {
        Output::Json => {
            let report = json!({
                "store": store,
                "hsm_uri": uri,
                "token": hsm.token(),
                "profile": hsm.profile(),
                "capabilities": hsm.capabilities(),
                "mechanisms": caps.mechanisms,
                "algorithms": caps.algorithms,
                "key_types": caps.key_types,
                "required_algorithms": caps.required,
                "refusals": caps.refusals,
                "xks": xks,
                "ekm": ekm,
                "external_proxies": external,
                "verdict": if refusal.is_none() { "ok" } else { "refused" },
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
            );
        }
        Output::Text => {
            let t = hsm.token();
            println!(
                "store: {}",
                serde_json::to_string(&store).map_err(|e| e.to_string())?
            );
            println!(
                "token: slot {} label {:?} serial {:?} ({} {}), library {}{}",
                t.slot,
                t.label,
                t.serial,
                t.manufacturer,
                t.model,
                t.library,
                if t.via_proxy {
                    " (through p11-kit's proxy)"
                } else {
                    ""
                }
            );
            println!(
                "profile: {} ({}, {}{})",
                t.profile,
                hsm.profile().product,
                if t.profile_configured {
                    "configured"
                } else {
                    "detected"
                },
                if hsm.profile().tested {
                    ", tested in keybroker's CI"
                } else {
                    ", NOT tested in keybroker's CI"
                }
            );
            println!("sessions: {}", t.sessions);
            if let Some(x) = &xks {
                println!("xks: {x}");
            }
            if let Some(x) = &ekm {
                println!("ekm: {x}");
            }
            if !external.is_empty() {
                println!("external proxies: {}", external.join(", "));
            }
            println!("slots:");
            for s in &t.slots {
                println!("  {s}");
            }
            print!("{}", crate::hsm::report::text(&caps));
            if !hsm.capabilities().notes.is_empty() {
                println!("notes:");
                for n in &hsm.capabilities().notes {
                    println!("  - {n}");
                }
            }
        }
    }
    match refusal {
        Some(why) => Err(why),
        None => {
            if output == Output::Text {
                println!("configuration OK");
            }
            Ok(())
        }
    }
}

/// What `check-config` says about the metadata store: reachable, which schema, and whether the
/// next start would migrate it. Changes nothing.
async fn probe_store(cfg: &Config) -> Result<serde_json::Value, String> {
    use crate::config::StoreLocation;
    let known = |v: Option<i64>, max: usize| match v {
        None => "empty: the broker creates its schema at start".to_string(),
        Some(v) if v == max as i64 => "up to date".to_string(),
        Some(v) if v < max as i64 => format!("the broker migrates it from {v} to {max} at start"),
        Some(v) => format!("{v} is NEWER than this keybroker understands ({max}): start refused"),
    };
    match cfg.store_location() {
        StoreLocation::Sqlite(path) => {
            let exists = path.exists();
            let schema = if exists {
                let p = path.clone();
                tokio::task::spawn_blocking(move || {
                    let c = rusqlite::Connection::open_with_flags(
                        &p,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )?;
                    c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("store.path {}: {e}", path.display()))
                .map(Some)?
            } else {
                None
            };
            if let Some(v) = schema
                && v > crate::store::sqlite::SCHEMA_VERSION as i64
            {
                return Err(format!(
                    "store.path {}: schema version {v} is newer than this keybroker understands",
                    path.display()
                ));
            }
            Ok(json!({
                "kind": "sqlite",
                "path": path,
                "schema_version": schema,
                "schema": known(schema.filter(|v| *v > 0), crate::store::sqlite::SCHEMA_VERSION),
            }))
        }
        StoreLocation::Postgres(url) => {
            use secrecy::ExposeSecret;
            let pw = cfg.read_store_password()?;
            let tls = cfg.store_tls()?;
            let u = url.clone();
            let (server, schema, encrypted) = tokio::task::spawn_blocking(move || {
                crate::store::PgStore::probe(&u, pw.as_ref().map(|p| p.expose_secret()), tls)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("store.url: cannot reach PostgreSQL: {e}"))?;
            let max = crate::store::postgres::MIGRATIONS.len();
            if schema.is_some_and(|v| v > max as i64) {
                return Err(format!(
                    "store.url: schema version {} is newer than this keybroker understands ({max})",
                    schema.unwrap_or_default()
                ));
            }
            let parsed: Result<tokio_postgres::Config, _> = url.parse();
            Ok(json!({
                "kind": "postgres",
                "url": parsed.map(|c| crate::store::postgres::describe_config(&c)).unwrap_or_default(),
                "server_version": server,
                "tls": encrypted,
                "schema_version": schema,
                "schema": known(schema, max),
                "max_staleness_ms": cfg.store.max_staleness_ms,
            }))
        }
    }
}

fn settings(c: &ConnArgs) -> Result<ClientSettings, String> {
    let need = |v: &Option<std::path::PathBuf>, flag: &str, env: &str| {
        v.clone().ok_or_else(|| {
            format!("{flag} (or {env}) is required; `keybroker dev` writes an env.sh that sets it")
        })
    };
    Ok(ClientSettings {
        endpoint: c.endpoint.clone(),
        ca: need(&c.ca_cert, "--ca-cert", "KEYBROKER_CA_CERT")?,
        cert: need(&c.client_cert, "--client-cert", "KEYBROKER_CLIENT_CERT")?,
        key: need(&c.client_key, "--client-key", "KEYBROKER_CLIENT_KEY")?,
    })
}

/// The request context from --request-id, --correlation-id and --justification.
fn context(c: &ConnArgs) -> Result<Option<pb::RequestContext>, String> {
    let justification = match &c.justification {
        None => None,
        Some(r) => {
            let reason =
                pb::JustificationReason::from_str_name(&r.to_ascii_uppercase().replace('-', "_"))
                    .filter(|r| *r != pb::JustificationReason::Unspecified)
                    .ok_or_else(|| {
                        format!(
                            "--justification {r:?}: unknown reason (e.g. CUSTOMER_INITIATED_ACCESS)"
                        )
                    })?;
            Some(pb::AccessJustification {
                reason: reason.into(),
                detail: c.justification_detail.clone().unwrap_or_default(),
            })
        }
    };
    if justification.is_none() && c.request_id.is_none() && c.correlation_id.is_none() {
        return Ok(None);
    }
    Ok(Some(pb::RequestContext {
        request_id: c.request_id.clone().unwrap_or_default(),
        correlation_id: c.correlation_id.clone().unwrap_or_default(),
        justification,
    }))
}

fn alg_name(v: i32) -> &'static str {
    match pb::Algorithm::try_from(v) {
        Ok(pb::Algorithm::Aes256Gcm) => "aes-256-gcm",
        Ok(pb::Algorithm::AesKeyWrapPad) => "aes-kwp",
        Ok(pb::Algorithm::AesKeyWrap) => "aes-kw",
        Ok(pb::Algorithm::RsaOaepSha256) => "rsa-oaep-sha256",
        Ok(pb::Algorithm::RsaOaepSha1) => "rsa-oaep-sha1",
        Ok(pb::Algorithm::RsaSign) => "rsa-sign",
        Ok(pb::Algorithm::Ecdsa) => "ecdsa",
        _ => "unspecified",
    }
}

/// A signature algorithm's JWS name, from the proto value.
fn sign_alg_name(v: i32) -> &'static str {
    use pb::SignatureAlgorithm as S;
    match S::try_from(v) {
        Ok(S::Es256) => "ES256",
        Ok(S::Es384) => "ES384",
        Ok(S::Rs256) => "RS256",
        Ok(S::Rs384) => "RS384",
        Ok(S::Rs512) => "RS512",
        Ok(S::Ps256) => "PS256",
        Ok(S::Ps384) => "PS384",
        Ok(S::Ps512) => "PS512",
        _ => "unspecified",
    }
}

/// `--alg` (ES256, ..., case-insensitive) as the proto value.
fn sign_alg(s: &str) -> Result<pb::SignatureAlgorithm, String> {
    use crate::model::SignAlgorithm as S;
    use pb::SignatureAlgorithm as P;
    Ok(
        match S::parse(s).ok_or_else(|| {
            format!(
                "unknown signature algorithm {s:?} (ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512)"
            )
        })? {
            S::Es256 => P::Es256,
            S::Es384 => P::Es384,
            S::Rs256 => P::Rs256,
            S::Rs384 => P::Rs384,
            S::Rs512 => P::Rs512,
            S::Ps256 => P::Ps256,
            S::Ps384 => P::Ps384,
            S::Ps512 => P::Ps512,
        },
    )
}

/// The digest to sign or verify: `--digest-hex`, `--digest-base64`, or the hash (under the
/// algorithm's hash) of the file `--file`.
fn digest_arg(
    alg: pb::SignatureAlgorithm,
    hex_digest: Option<String>,
    b64: Option<String>,
    file: Option<std::path::PathBuf>,
) -> Result<Vec<u8>, String> {
    use sha2::Digest;
    match (hex_digest, b64, file) {
        (Some(h), _, _) => {
            hex::decode(h.trim()).map_err(|e| format!("--digest-hex is not valid hex: {e}"))
        }
        (None, Some(b), _) => decode_b64("--digest-base64", &b),
        (None, None, Some(f)) => {
            let data =
                std::fs::read(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            use pb::SignatureAlgorithm as S;
            Ok(match alg {
                S::Es256 | S::Rs256 | S::Ps256 => sha2::Sha256::digest(&data).to_vec(),
                S::Es384 | S::Rs384 | S::Ps384 => sha2::Sha384::digest(&data).to_vec(),
                _ => sha2::Sha512::digest(&data).to_vec(),
            })
        }
        (None, None, None) => Err("give --digest-hex, --digest-base64 or --file".into()),
    }
}

fn alg_to_pb(a: Algorithm) -> pb::Algorithm {
    match a {
        Algorithm::Aes256Gcm => pb::Algorithm::Aes256Gcm,
        Algorithm::AesKeyWrapPad => pb::Algorithm::AesKeyWrapPad,
        Algorithm::AesKeyWrap => pb::Algorithm::AesKeyWrap,
        Algorithm::RsaOaepSha256 => pb::Algorithm::RsaOaepSha256,
        Algorithm::RsaOaepSha1 => pb::Algorithm::RsaOaepSha1,
        Algorithm::RsaSign => pb::Algorithm::RsaSign,
        Algorithm::Ecdsa => pb::Algorithm::Ecdsa,
    }
}

fn key_json(k: &pb::Key) -> serde_json::Value {
    json!({
        "name": k.name,
        "key_type": match pb::KeyType::try_from(k.key_type) {
            Ok(pb::KeyType::Aes256) => "aes-256",
            Ok(pb::KeyType::Rsa2048) => "rsa-2048",
            Ok(pb::KeyType::Rsa3072) => "rsa-3072",
            Ok(pb::KeyType::Rsa4096) => "rsa-4096",
            Ok(pb::KeyType::EcP256) => "ec-p256",
            Ok(pb::KeyType::EcP384) => "ec-p384",
            _ => "unspecified",
        },
        "algorithm": alg_name(k.algorithm),
        "mechanism": k.mechanism,
        "state": match pb::KeyState::try_from(k.state) {
            Ok(pb::KeyState::Enabled) => "enabled",
            Ok(pb::KeyState::Quarantined) => "quarantined",
            _ => "unspecified",
        },
        "created_at_ms": k.created_at_ms,
        "external": k.external.as_ref().map(|x| json!({
            "proxy": x.proxy, "remote_key": x.remote_key,
        })),
        "double": k.double.as_ref().map(|d| json!({
            "local": d.local, "external": d.external,
        })),
        "current_version": k.current_version,
                "versions": k.versions.iter().map(|v| json!({
            "version": v.version, "id": hex::encode(&v.id), "created_at_ms": v.created_at_ms,
            "origin": v.origin, "expires_ms": v.expires_ms, "decryptable": v.decryptable,
            "wraps": v.wraps, "unwraps": v.unwraps, "last_used_ms": v.last_used_ms,
        })).collect::<Vec<_>>(),
        "attributes": k.attributes.as_ref().map(|a| json!({
            "enabled": a.enabled, "not_before_ms": a.not_before_ms, "expires_ms": a.expires_ms,
            "operations": a.operations.as_ref().map(|o| o.operations.iter().map(|x| match pb::KeyOperation::try_from(*x) {
                Ok(pb::KeyOperation::Wrap) => "wrap", Ok(pb::KeyOperation::Unwrap) => "unwrap",
                Ok(pb::KeyOperation::GenerateDataKey) => "generate-data-key", Ok(pb::KeyOperation::Rewrap) => "rewrap",
                Ok(pb::KeyOperation::Encrypt) => "encrypt", Ok(pb::KeyOperation::Decrypt) => "decrypt",
                Ok(pb::KeyOperation::Sign) => "sign", Ok(pb::KeyOperation::Verify) => "verify",
                _ => "unknown" }).collect::<Vec<_>>()),
            "tags": a.tags.as_ref().map(|t| t.tags.clone()),
            "min_decryption_version": a.min_decryption_version, "purge_protection": a.purge_protection,
            "rotation_period_ms": a.rotation_period_ms, "version_expiry_ms": a.version_expiry_ms,
        })),
    })
}

/// A time for a table: RFC 3339 in UTC to the millisecond; `0` (unset) is "never". Epoch
/// milliseconds are for `-o json` only.
pub(super) fn when(ms: i64) -> String {
    if ms == 0 {
        return "never".into();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms since 1970"))
}

/// A duration for a table (`0`: "none"): days, hours, minutes and seconds that are not zero.
pub(super) fn span(ms: i64) -> String {
    if ms <= 0 {
        return "none".into();
    }
    let s = ms / 1000;
    let parts = [
        (s / 86_400, "d"),
        (s / 3600 % 24, "h"),
        (s / 60 % 60, "m"),
        (s % 60, "s"),
    ];
    let out: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect();
    if out.is_empty() {
        format!("{ms}ms")
    } else {
        out.join(" ")
    }
}

/// Prints rows under a header, each column as wide as its widest cell (people read columns).
pub(super) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Whether a key of this algorithm signs (its usage counts signatures and verifications).
fn is_signing(algorithm: i32) -> bool {
    matches!(
        pb::Algorithm::try_from(algorithm),
        Ok(pb::Algorithm::RsaSign | pb::Algorithm::Ecdsa)
    )
}

/// A key's versions as a table, times in RFC 3339 (`-o json` keeps the milliseconds). A
/// signing key's usage is signatures and verifications, a wrapping key's wraps and unwraps.
fn print_versions(versions: &[pb::KeyVersion], signing: bool) {
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                hex::encode(&v.id),
                v.origin.clone(),
                when(v.created_at_ms),
                v.wraps.to_string(),
                v.unwraps.to_string(),
                when(v.last_used_ms),
                if signing {
                    "-"
                } else if v.decryptable {
                    "yes"
                } else {
                    "no (below min)"
                }
                .to_string(),
            ]
        })
        .collect();
    let (used, checked) = if signing {
        ("SIGNS", "VERIFIES")
    } else {
        ("WRAPS", "UNWRAPS")
    };
    print_table(
        &[
            "VERSION",
            "ID",
            "ORIGIN",
            "CREATED",
            used,
            checked,
            "LAST USED",
            "UNWRAPS?",
        ],
        &rows,
    );
}

fn print_key(k: &pb::Key, out: Output) {
    let j = key_json(k);
    match out {
        Output::Json => println!("{j}"),
        Output::Text => {
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            let mut rows = vec![
                vec!["name".to_string(), k.name.clone()],
                vec!["type".into(), text(&j["key_type"])],
                vec!["algorithm".into(), text(&j["algorithm"])],
                vec!["mechanism".into(), k.mechanism.clone()],
                vec!["state".into(), text(&j["state"])],
                vec!["current version".into(), k.current_version.to_string()],
                vec!["created".into(), when(k.created_at_ms)],
            ];
            if let Some(x) = &k.external {
                rows.push(vec![
                    "external".into(),
                    format!("{} at proxy {}", x.remote_key, x.proxy),
                ]);
            }
            if let Some(d) = &k.double {
                rows.push(vec![
                    "double".into(),
                    format!("local {}, external {}", d.local, d.external),
                ]);
            }
            if let Some(a) = j.get("attributes").and_then(|a| a.as_object()) {
                for (name, v) in a {
                    // Times and durations in people's units; `-o json` keeps the milliseconds.
                    let (label, shown) = match (name.strip_suffix("_ms"), v.as_i64()) {
                        (Some(n), Some(ms)) if n.ends_with("period") || n.ends_with("expiry") => {
                            (n.to_string(), span(ms))
                        }
                        (Some(n), Some(ms)) => (n.to_string(), when(ms)),
                        _ => (name.clone(), text(v)),
                    };
                    rows.push(vec![label.replace('_', " "), shown]);
                }
            }
            print_table(&["FIELD", "VALUE"], &rows);
            if !k.versions.is_empty() {
                println!();
                print_versions(&k.versions, is_signing(k.algorithm));
            }
        }
    }
}

/// Writes a secret to a new file only its owner may read (refuses to replace a file).
fn write_new_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn decode_b64(what: &str, s: &str) -> Result<Vec<u8>, String> {
    B64.decode(s.trim())
        .map_err(|e| format!("{what} is not valid base64: {e}"))
}

/// `--operations wrap,unwrap,...` (`key create`, `key update`).
fn parse_operations(s: &str) -> Result<pb::KeyOperations, String> {
    let operations = s
        .split(',')
        .filter(|o| !o.trim().is_empty())
        .map(|o| match o.trim() {
            "wrap" => Ok(pb::KeyOperation::Wrap.into()),
            "unwrap" => Ok(pb::KeyOperation::Unwrap.into()),
            "generate-data-key" => Ok(pb::KeyOperation::GenerateDataKey.into()),
            "rewrap" => Ok(pb::KeyOperation::Rewrap.into()),
            "encrypt" => Ok(pb::KeyOperation::Encrypt.into()),
            "decrypt" => Ok(pb::KeyOperation::Decrypt.into()),
            "sign" => Ok(pb::KeyOperation::Sign.into()),
            "verify" => Ok(pb::KeyOperation::Verify.into()),
            other => Err(format!(
                "unknown operation {other:?} (wrap, unwrap, generate-data-key, rewrap, encrypt, decrypt, sign, verify)"
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(pb::KeyOperations { operations })
}

/// `--tag name=value` (repeatable; no flag: unchanged, `--tag ""`: none).
fn parse_tags(tags: &[String]) -> Result<Option<pb::KeyTags>, String> {
    if tags.is_empty() {
        return Ok(None);
    }
    let mut m = std::collections::HashMap::new();
    for t in tags.iter().filter(|t| !t.is_empty()) {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| format!("--tag {t:?}: use name=value"))?;
        m.insert(k.to_string(), v.to_string());
    }
    Ok(Some(pb::KeyTags { tags: m }))
}

/// Runs a client subcommand.
pub(super) async fn client_command(cmd: Command) -> Result<(), String> {
    match cmd {
        Command::Key { command, conn } => {
            let mut c = clients(&settings(&conn)?).await?;
            match command {
                KeyCommand::Create {
                    name,
                    key_type,
                    algorithm,
                    external,
                    remote_key,
                    double_local,
                    double_external,
                    operations,
                    tags,
                } => {
                    let attributes = match (operations, parse_tags(&tags)?) {
                        (None, None) => None,
                        (ops, tags) => Some(pb::KeyAttributes {
                            operations: ops.as_deref().map(parse_operations).transpose()?,
                            tags,
                            ..Default::default()
                        }),
                    };
                    // A double key names its members, an external key its proxy and remote
                    // key; a local key its type and algorithm.
                    let request = if let Some(local) = double_local {
                        pb::CreateKeyRequest {
                            key: name,
                            double: Some(pb::DoubleKeyMembers {
                                local,
                                external: double_external.unwrap_or_default(),
                            }),
                            attributes,
                            ..Default::default()
                        }
                    } else if let Some(proxy) = external {
                        pb::CreateKeyRequest {
                            key: name,
                            external: Some(pb::ExternalKeyReference {
                                proxy,
                                remote_key: remote_key.unwrap_or_default(),
                            }),
                            attributes,
                            ..Default::default()
                        }
                    } else {
                        let kt = KeyType::parse(&key_type).ok_or_else(|| {
                            format!(
                                "unknown key type {key_type:?} (aes-256, rsa-2048, rsa-3072, rsa-4096, ec-p256, ec-p384)"
                            )
                        })?;
                        let alg = match algorithm {
                            Some(a) => alg_to_pb(Algorithm::parse(&a).ok_or_else(|| {
                                format!("unknown algorithm {a:?} (aes-256-gcm, aes-kwp, aes-kw, rsa-oaep-sha256, rsa-oaep-sha1, rsa-sign, ecdsa)")
                            })?),
                            None => pb::Algorithm::Unspecified,
                        };
                        let kt = match kt {
                            KeyType::Aes256 => pb::KeyType::Aes256,
                            KeyType::Rsa2048 => pb::KeyType::Rsa2048,
                            KeyType::Rsa3072 => pb::KeyType::Rsa3072,
                            KeyType::Rsa4096 => pb::KeyType::Rsa4096,
                            KeyType::EcP256 => pb::KeyType::EcP256,
                            KeyType::EcP384 => pb::KeyType::EcP384,
                        };
                        pb::CreateKeyRequest {
                            key: name,
                            key_type: kt.into(),
                            algorithm: alg.into(),
                            attributes,
                            ..Default::default()
                        }
                    };
                    let k = c
                        .mgmt
                        .create_key(request)
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&k, conn.output);
                }
                KeyCommand::Get { name } => {
                    let k = c
                        .mgmt
                        .get_key(pb::GetKeyRequest { key: name })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&k, conn.output);
                }
                KeyCommand::RewrapAll {
                    input,
                    output_file,
                    to,
                    concurrency,
                    progress,
                } => {
                    super::bulk::rewrap_all(
                        &c,
                        super::bulk::RewrapAll {
                            input,
                            output_file,
                            to,
                            concurrency,
                            progress,
                            out: conn.output,
                            context: context(&conn)?,
                        },
                    )
                    .await?;
                }
                KeyCommand::Rotate { name } => {
                    let k = c
                        .mgmt
                        .rotate_key(pb::RotateKeyRequest { key: name })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&k, conn.output);
                }
                KeyCommand::Update {
                    name,
                    enable,
                    disable,
                    operations,
                    tags,
                    min_decryption_version,
                    purge_protection,
                    set_times,
                    not_before_ms,
                    expires_ms,
                    rotation_period_ms,
                    version_expiry_ms,
                } => {
                    let ops = operations.as_deref().map(parse_operations).transpose()?;
                    let tags = parse_tags(&tags)?;
                    let attributes = pb::KeyAttributes {
                        enabled: if enable {
                            Some(true)
                        } else if disable {
                            Some(false)
                        } else {
                            None
                        },
                        not_before_ms,
                        expires_ms,
                        operations: ops,
                        tags,
                        min_decryption_version: min_decryption_version.unwrap_or(0),
                        purge_protection: purge_protection.then_some(true),
                        rotation_period_ms,
                        version_expiry_ms,
                    };
                    let k = c
                        .mgmt
                        .update_key(pb::UpdateKeyRequest {
                            key: name,
                            attributes: Some(attributes),
                            set_times,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&k, conn.output);
                }
                KeyCommand::Versions { name } => {
                    let r = c
                        .mgmt
                        .list_key_versions(pb::ListKeyVersionsRequest { key: name.clone() })
                        .await
                        .map_err(status)?
                        .into_inner();
                    match conn.output {
                        Output::Json => println!(
                            "{}",
                            json!({"min_decryption_version": r.min_decryption_version, "versions": r.versions.iter().map(|v| json!({
                                "version": v.version, "id": hex::encode(&v.id), "origin": v.origin, "created_at_ms": v.created_at_ms,
                                "expires_ms": v.expires_ms, "decryptable": v.decryptable, "wraps": v.wraps, "unwraps": v.unwraps,
                                "last_used_ms": v.last_used_ms})).collect::<Vec<_>>()})
                        ),
                        Output::Text => {
                            let k = c
                                .mgmt
                                .get_key(pb::GetKeyRequest { key: name })
                                .await
                                .map_err(status)?
                                .into_inner();
                            print_versions(&r.versions, is_signing(k.algorithm));
                        }
                    }
                }
                KeyCommand::Trim { name } => {
                    let r = c
                        .mgmt
                        .trim_key_versions(pb::TrimKeyVersionsRequest { key: name })
                        .await
                        .map_err(status)?
                        .into_inner();
                    println!("destroyed versions: {:?}", r.destroyed_versions);
                }
                KeyCommand::Delete { name } => {
                    let d = c
                        .mgmt
                        .delete_key(pb::DeleteKeyRequest { key: name })
                        .await
                        .map_err(status)?
                        .into_inner();
                    match conn.output {
                        Output::Json => println!(
                            "{}",
                            json!({"name": d.key.map(|k| k.name).unwrap_or_default(),
                                "deleted_at_ms": d.deleted_at_ms, "scheduled_purge_ms": d.scheduled_purge_ms,
                                "deleted_by": d.deleted_by})
                        ),
                        Output::Text => println!(
                            "deleted at {}; recoverable until the scheduled purge at {} (RecoverKey), deleted by {}",
                            when(d.deleted_at_ms),
                            when(d.scheduled_purge_ms),
                            d.deleted_by
                        ),
                    }
                }
                KeyCommand::Deleted { tenant } => {
                    let r = c
                        .mgmt
                        .list_deleted_keys(pb::ListDeletedKeysRequest { tenant })
                        .await
                        .map_err(status)?
                        .into_inner();
                    let items: Vec<_> = r
                        .keys
                        .into_iter()
                        .map(|d| {
                            (
                                d.key.map(|k| k.name).unwrap_or_default(),
                                d.deleted_at_ms,
                                d.scheduled_purge_ms,
                                d.deleted_by,
                            )
                        })
                        .collect();
                    match conn.output {
                        Output::Json => println!(
                            "{}",
                            json!(items.iter().map(|(n, at, purge, by)| json!({"name": n, "deleted_at_ms": at, "scheduled_purge_ms": purge, "deleted_by": by})).collect::<Vec<_>>())
                        ),
                        Output::Text => print_table(
                            &["NAME", "DELETED", "PURGE AT", "DELETED BY"],
                            &items
                                .iter()
                                .map(|(n, at, purge, by)| {
                                    vec![n.clone(), when(*at), when(*purge), by.clone()]
                                })
                                .collect::<Vec<_>>(),
                        ),
                    }
                }
                KeyCommand::Recover { name } => {
                    let k = c
                        .mgmt
                        .recover_key(pb::RecoverKeyRequest { key: name })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&k, conn.output);
                }
                KeyCommand::Purge { name } => {
                    let r = c
                        .mgmt
                        .purge_key(pb::PurgeKeyRequest { key: name })
                        .await
                        .map_err(status)?
                        .into_inner();
                    match conn.output {
                        Output::Json => println!(
                            "{}",
                            json!({"key": r.key, "versions": r.versions, "object_ids": r.object_ids, "objects_destroyed": r.objects_destroyed,
                                "purged_at_ms": r.purged_at_ms, "purged_by": r.purged_by, "final": r.r#final,
                                "backups": r.backups.iter().map(|b| json!({"sha256": b.sha256, "version_ids": b.version_ids,
                                    "made_at_ms": b.made_at_ms, "made_by": b.made_by})).collect::<Vec<_>>()})
                        ),
                        Output::Text => {
                            println!(
                                "purged {} at {} by {}: versions {:?}, {} HSM object(s) destroyed{}",
                                r.key,
                                when(r.purged_at_ms),
                                r.purged_by,
                                r.versions,
                                r.objects_destroyed,
                                if r.r#final { "" } else { " (not final)" }
                            );
                            if !r.backups.is_empty() {
                                print_table(
                                    &["BACKUP SHA256", "VERSIONS", "MADE", "MADE BY"],
                                    &r.backups
                                        .iter()
                                        .map(|b| {
                                            vec![
                                                b.sha256.clone(),
                                                b.version_ids.join(","),
                                                when(b.made_at_ms),
                                                b.made_by.clone(),
                                            ]
                                        })
                                        .collect::<Vec<_>>(),
                                );
                            }
                        }
                    }
                    if !r.r#final {
                        eprintln!(
                            "not final: {} backup blob(s) of these versions were made (sha256 {}); \
                             the key can be restored from any of them until they are destroyed",
                            r.backups.len(),
                            r.backups
                                .iter()
                                .map(|b| b.sha256.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
                KeyCommand::Backup { name, out } => {
                    let r = c
                        .mgmt
                        .backup_key(pb::BackupKeyRequest { key: name.clone() })
                        .await
                        .map_err(status)?
                        .into_inner();
                    std::fs::write(&out, &r.backup)
                        .map_err(|e| format!("write {}: {e}", out.display()))?;
                    println!(
                        "{}",
                        json!({"key": name, "file": out.display().to_string(), "bytes": r.backup.len(),
                            "versions": r.versions, "domain_id": r.domain_id, "sha256": r.sha256})
                    );
                }
                KeyCommand::Restore { file } => {
                    let backup = std::fs::read(&file)
                        .map_err(|e| format!("read {}: {e}", file.display()))?;
                    let k = c
                        .mgmt
                        .restore_key(pb::RestoreKeyRequest { backup })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&k, conn.output);
                }
                KeyCommand::ImportKey {
                    key_type,
                    pem_out,
                    algorithm,
                } => {
                    let kt = match key_type.as_str() {
                        "rsa-3072" => pb::KeyType::Rsa3072,
                        "rsa-4096" => pb::KeyType::Rsa4096,
                        other => return Err(format!("--type {other:?}: use rsa-3072 or rsa-4096")),
                    };
                    let r = c
                        .mgmt
                        .create_import_key(pb::CreateImportKeyRequest {
                            key_type: kt.into(),
                            algorithm: match algorithm {
                                Some(a) => alg_to_pb(
                                    Algorithm::parse(&a)
                                        .ok_or_else(|| format!("unknown algorithm {a:?}"))?,
                                ),
                                None => pb::Algorithm::Unspecified,
                            }
                            .into(),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    if let Some(p) = pem_out {
                        std::fs::write(&p, &r.spki_pem)
                            .map_err(|e| format!("write {}: {e}", p.display()))?;
                    }
                    match conn.output {
                        Output::Json => println!(
                            "{}",
                            json!({"import_key_id": r.import_key_id, "oaep": alg_name(r.oaep), "imports": alg_name(r.algorithm), "expires_ms": r.expires_ms, "spki_pem": r.spki_pem})
                        ),
                        Output::Text => {
                            println!("import key id: {}", r.import_key_id);
                            println!(
                                "RSA-OAEP hash: {}",
                                if alg_name(r.oaep) == "rsa-oaep-sha1" {
                                    "sha1"
                                } else {
                                    "sha256"
                                }
                            );
                            println!("imports: {} keys (one import)", alg_name(r.algorithm));
                            println!("expires at: {}", when(r.expires_ms));
                            print!("{}", r.spki_pem);
                        }
                    }
                }
                KeyCommand::Import {
                    name,
                    import_key_id,
                    wrapped_file,
                    algorithm,
                } => {
                    let material = std::fs::read(&wrapped_file)
                        .map_err(|e| format!("read {}: {e}", wrapped_file.display()))?;
                    let alg = match algorithm {
                        Some(a) => alg_to_pb(
                            Algorithm::parse(&a)
                                .ok_or_else(|| format!("unknown algorithm {a:?}"))?,
                        ),
                        None => pb::Algorithm::Unspecified,
                    };
                    let k = c
                        .mgmt
                        .import_key(pb::ImportKeyRequest {
                            key: name,
                            key_type: pb::KeyType::Aes256.into(),
                            algorithm: alg.into(),
                            attributes: None,
                            import_key_id,
                            wrapped_material: material,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&k, conn.output);
                }
                KeyCommand::List { tenant } => {
                    let mut token = String::new();
                    let mut all = Vec::new();
                    loop {
                        let page = c
                            .mgmt
                            .list_keys(pb::ListKeysRequest {
                                tenant: tenant.clone(),
                                page_size: 1000,
                                page_token: token,
                            })
                            .await
                            .map_err(status)?
                            .into_inner();
                        all.extend(page.keys);
                        if page.next_page_token.is_empty() {
                            break;
                        }
                        token = page.next_page_token;
                    }
                    match conn.output {
                        Output::Json => {
                            println!("{}", json!(all.iter().map(key_json).collect::<Vec<_>>()))
                        }
                        Output::Text => {
                            if all.is_empty() {
                                println!("(no keys in tenant {tenant})");
                            }
                            println!(
                                "{:<40} {:<9} {:<16} {:>7}",
                                "NAME", "TYPE", "ALGORITHM", "VERSION"
                            );
                            for k in &all {
                                let j = key_json(k);
                                println!(
                                    "{:<40} {:<9} {:<16} {:>7}",
                                    k.name,
                                    j["key_type"].as_str().unwrap_or(""),
                                    j["algorithm"].as_str().unwrap_or(""),
                                    k.current_version
                                );
                            }
                        }
                    }
                }
            }
        }
        Command::Wrap {
            key,
            plaintext_hex,
            plaintext_base64,
            aad,
            conn,
        } => {
            let plaintext = match (plaintext_hex, plaintext_base64) {
                (Some(h), _) => hex::decode(h.trim())
                    .map_err(|e| format!("--plaintext-hex is not valid hex: {e}"))?,
                (None, Some(b)) => decode_b64("--plaintext-base64", &b)?,
                (None, None) => return Err("give --plaintext-hex or --plaintext-base64".into()),
            };
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .wrap_key(pb::WrapKeyRequest {
                    key,
                    plaintext,
                    aad: aad.into_bytes(),
                    context: context(&conn)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"wrapped_key": B64.encode(&r.wrapped_key), "key": r.key, "key_version": r.key_version, "algorithm": alg_name(r.algorithm)})
                ),
                Output::Text => println!("{}", B64.encode(&r.wrapped_key)),
            }
        }
        Command::Unwrap {
            wrapped,
            key,
            aad,
            conn,
        } => {
            let env = decode_b64("the envelope", &wrapped)?;
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .unwrap_key(pb::UnwrapKeyRequest {
                    key: key.unwrap_or_default(),
                    aad: aad.into_bytes(),
                    context: context(&conn)?,
                    wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(env)),
                })
                .await
                .map_err(status)?
                .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"plaintext_hex": hex::encode(&r.plaintext), "key": r.key, "key_version": r.key_version, "algorithm": alg_name(r.algorithm)})
                ),
                Output::Text => println!("{}", hex::encode(&r.plaintext)),
            }
        }
        Command::UnwrapRaw {
            key,
            ciphertext,
            version,
            algorithm,
            conn,
        } => {
            let ct = decode_b64("the ciphertext", &ciphertext)?;
            let alg = Algorithm::parse(&algorithm)
                .filter(|a| a.is_rsa())
                .ok_or_else(|| {
                    format!("--algorithm {algorithm:?}: use rsa-oaep-sha256 or rsa-oaep-sha1")
                })?;
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .unwrap_key(pb::UnwrapKeyRequest {
                    key,
                    aad: Vec::new(),
                    context: context(&conn)?,
                    wrapped: Some(pb::unwrap_key_request::Wrapped::Raw(pb::RawCiphertext {
                        ciphertext: ct,
                        key_version: version,
                        algorithm: alg_to_pb(alg).into(),
                    })),
                })
                .await
                .map_err(status)?
                .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"plaintext_hex": hex::encode(&r.plaintext), "key": r.key, "key_version": r.key_version})
                ),
                Output::Text => println!("{}", hex::encode(&r.plaintext)),
            }
        }
        Command::GenerateDataKey {
            key,
            length,
            aad,
            conn,
        } => {
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key,
                    length,
                    aad: aad.into_bytes(),
                    context: context(&conn)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"plaintext_hex": hex::encode(&r.plaintext), "wrapped_key": B64.encode(&r.wrapped_key),
                        "key": r.key, "key_version": r.key_version, "algorithm": alg_name(r.algorithm)})
                ),
                Output::Text => {
                    println!("plaintext (hex): {}", hex::encode(&r.plaintext));
                    println!("wrapped (base64): {}", B64.encode(&r.wrapped_key));
                    println!(
                        "key: {} v{} {}",
                        r.key,
                        r.key_version,
                        alg_name(r.algorithm)
                    );
                }
            }
        }
        Command::Rewrap {
            wrapped,
            aad,
            to,
            conn,
        } => {
            let env = decode_b64("the envelope", &wrapped)?;
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .rewrap(pb::RewrapRequest {
                    key: String::new(),
                    envelope: env,
                    aad: aad.into_bytes(),
                    destination_key: to.unwrap_or_default(),
                    new_aad: Vec::new(),
                    change_aad: false,
                    context: context(&conn)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"wrapped_key": B64.encode(&r.wrapped_key), "key": r.key, "key_version": r.key_version, "source_key_version": r.source_key_version})
                ),
                Output::Text => println!("{}", B64.encode(&r.wrapped_key)),
            }
        }
        Command::Encrypt {
            key,
            plaintext,
            plaintext_base64,
            plaintext_file,
            aad,
            conn,
        } => {
            let payload = Dek::new(match (plaintext, plaintext_base64, plaintext_file) {
                (Some(t), _, _) => t.into_bytes(),
                (None, Some(b), _) => decode_b64("--plaintext-base64", &b)?,
                (None, None, Some(f)) => {
                    std::fs::read(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
                }
                (None, None, None) => {
                    return Err("give --plaintext, --plaintext-base64 or --plaintext-file".into());
                }
            });
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .encrypt(pb::EncryptRequest {
                    key,
                    plaintext: payload.expose().to_vec(),
                    aad: aad.into_bytes(),
                    context: context(&conn)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            let ct = B64.encode(&r.ciphertext);
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"ciphertext": ct, "key": r.key, "key_version": r.key_version, "algorithm": alg_name(r.algorithm)})
                ),
                Output::Text => print_table(
                    &["KEY", "VERSION", "ALGORITHM", "CIPHERTEXT (BASE64)"],
                    &[vec![
                        r.key,
                        r.key_version.to_string(),
                        alg_name(r.algorithm).to_string(),
                        ct,
                    ]],
                ),
            }
        }
        Command::Decrypt {
            ciphertext,
            key,
            aad,
            out,
            conn,
        } => {
            let ct = decode_b64("the ciphertext", &ciphertext)?;
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .decrypt(pb::DecryptRequest {
                    key: key.unwrap_or_default(),
                    ciphertext: ct,
                    aad: aad.into_bytes(),
                    context: context(&conn)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            let plaintext = Dek::new(r.plaintext);
            let shown = match &out {
                Some(path) => {
                    write_new_private(path, plaintext.expose())?;
                    None
                }
                None => Some(zeroize::Zeroizing::new(B64.encode(plaintext.expose()))),
            };
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"plaintext_base64": shown.as_deref().map(String::as_str),
                        "written_to": out.as_ref().map(|p| p.display().to_string()),
                        "bytes": plaintext.len(),
                        "key": r.key, "key_version": r.key_version, "algorithm": alg_name(r.algorithm)})
                ),
                Output::Text => print_table(
                    &["KEY", "VERSION", "ALGORITHM", "PLAINTEXT (BASE64)"],
                    &[vec![
                        r.key,
                        r.key_version.to_string(),
                        alg_name(r.algorithm).to_string(),
                        match (&shown, &out) {
                            (Some(s), _) => s.to_string(),
                            (None, Some(p)) => {
                                format!("({} bytes written to {})", plaintext.len(), p.display())
                            }
                            (None, None) => String::new(),
                        },
                    ]],
                ),
            }
        }
        Command::Sign {
            key,
            alg,
            digest_hex,
            digest_base64,
            file,
            conn,
        } => {
            let alg = sign_alg(&alg)?;
            let digest = digest_arg(alg, digest_hex, digest_base64, file)?;
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .sign(pb::SignRequest {
                    key,
                    algorithm: alg.into(),
                    digest,
                    context: context(&conn)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            let sig = B64.encode(&r.signature);
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"signature": sig, "signature_hex": hex::encode(&r.signature), "key": r.key,
                        "key_version": r.key_version, "key_version_id": hex::encode(&r.key_version_id),
                        "algorithm": sign_alg_name(r.algorithm)})
                ),
                Output::Text => print_table(
                    &["KEY", "VERSION", "ALGORITHM", "SIGNATURE (BASE64)"],
                    &[vec![
                        r.key,
                        r.key_version.to_string(),
                        sign_alg_name(r.algorithm).to_string(),
                        sig,
                    ]],
                ),
            }
        }
        Command::Verify {
            key,
            alg,
            version,
            digest_hex,
            digest_base64,
            file,
            signature,
            conn,
        } => {
            let alg = sign_alg(&alg)?;
            let digest = digest_arg(alg, digest_hex, digest_base64, file)?;
            let signature = match hex::decode(signature.trim()) {
                Ok(b) => b,
                Err(_) => decode_b64("the signature", &signature)?,
            };
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .verify(pb::VerifyRequest {
                    key,
                    key_version: version,
                    algorithm: alg.into(),
                    digest,
                    signature,
                    context: context(&conn)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"valid": r.valid, "key": r.key, "key_version": r.key_version,
                        "algorithm": sign_alg_name(alg.into())})
                ),
                Output::Text => print_table(
                    &["KEY", "VERSION", "ALGORITHM", "VALID"],
                    &[vec![
                        r.key,
                        r.key_version.to_string(),
                        sign_alg_name(alg.into()).to_string(),
                        if r.valid { "yes" } else { "no" }.to_string(),
                    ]],
                ),
            }
            if !r.valid {
                return Err("the signature is not valid".into());
            }
        }
        Command::Random { count, hex, conn } => {
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .get_random_bytes(pb::GetRandomBytesRequest {
                    count,
                    context: None,
                })
                .await
                .map_err(status)?
                .into_inner();
            let bytes = zeroize::Zeroizing::new(r.random);
            let text = zeroize::Zeroizing::new(if hex {
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            } else {
                B64.encode(&*bytes)
            });
            match conn.output {
                Output::Json => println!("{}", json!({"count": bytes.len(), "random": *text})),
                Output::Text => println!("{}", *text),
            }
        }
        Command::PublicKey {
            key,
            version,
            format,
            conn,
        } => {
            let mut c = clients(&settings(&conn)?).await?;
            let r = c
                .broker
                .get_public_key(pb::GetPublicKeyRequest {
                    key,
                    key_version: version,
                })
                .await
                .map_err(status)?
                .into_inner();
            match (conn.output, format.as_str()) {
                (Output::Json, _) => println!(
                    "{}",
                    json!({"key": r.key, "key_version": r.key_version, "algorithm": alg_name(r.algorithm), "spki_pem": r.spki_pem, "jwk": serde_json::from_str::<serde_json::Value>(&r.jwk).unwrap_or_default()})
                ),
                (Output::Text, "jwk") => println!("{}", r.jwk),
                (Output::Text, "pem") => print!("{}", r.spki_pem),
                (_, other) => return Err(format!("--format {other:?}: use pem or jwk")),
            }
        }
        Command::Hyok { command, conn } => {
            let ch = crate::client::connect(&settings(&conn)?).await?;
            let mut c = pb::hyok_client::HyokClient::new(ch);
            let st = match command {
                HyokCommand::Disconnect { reason } => {
                    c.disconnect(pb::HyokSwitchRequest { reason }).await
                }
                HyokCommand::Reconnect { reason } => {
                    c.reconnect(pb::HyokSwitchRequest { reason }).await
                }
                HyokCommand::Status => c.get_state(pb::GetHyokStateRequest {}).await,
            }
            .map_err(status)?
            .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    json!({"connected": st.connected, "changed_at_ms": st.changed_at_ms, "changed_by": st.changed_by, "reason": st.reason})
                ),
                Output::Text => println!(
                    "HYOK service access: {}  (changed {} by {} reason={:?})",
                    if st.connected {
                        "CONNECTED"
                    } else {
                        "DISCONNECTED"
                    },
                    when(st.changed_at_ms),
                    if st.changed_by.is_empty() {
                        "-"
                    } else {
                        &st.changed_by
                    },
                    st.reason
                ),
            }
        }
        Command::Audit {
            command:
                AuditCommand::Query {
                    key,
                    caller,
                    outcome,
                    since_ms,
                    until_ms,
                    limit,
                    conn,
                },
        } => {
            let ch = crate::client::connect(&settings(&conn)?).await?;
            let mut c = pb::audit_client::AuditClient::new(ch);
            let mut token = String::new();
            let mut left = limit;
            let mut rows: Vec<Vec<String>> = Vec::new();
            while left > 0 {
                let page = c
                    .query_audit(pb::QueryAuditRequest {
                        since_ms,
                        until_ms,
                        key: key.clone().unwrap_or_default(),
                        caller: caller.clone().unwrap_or_default(),
                        outcome: outcome.clone().unwrap_or_default(),
                        page_size: left.min(1000),
                        page_token: token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                left = left.saturating_sub(page.records.len() as u32);
                match conn.output {
                    // JSON Lines: each record exactly as stored (hash-chained).
                    Output::Json => {
                        for r in page.records {
                            println!("{r}");
                        }
                    }
                    Output::Text => {
                        rows.extend(page.records.iter().map(|r| {
                            let v: serde_json::Value = serde_json::from_str(r).unwrap_or_default();
                            let f = |k: &str| match &v[k] {
                                serde_json::Value::String(s) => s.clone(),
                                serde_json::Value::Null => "-".into(),
                                other => other.to_string(),
                            };
                            vec![
                                f("seq"),
                                f("time"),
                                f("caller"),
                                f("op"),
                                f("key"),
                                f("version"),
                                f("outcome"),
                            ]
                        }));
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if conn.output == Output::Text {
                print_table(
                    &["SEQ", "TIME", "CALLER", "OP", "KEY", "VERSION", "OUTCOME"],
                    &rows,
                );
            }
        }
        #[cfg(feature = "dev")]
        Command::Dev { .. } => {
            return Err("not a client command".into());
        }
        Command::Serve { .. }
        | Command::CheckConfig { .. }
        | Command::Domain { .. }
        | Command::Audit { .. } => {
            return Err("not a client command".into());
        }
    }
    Ok(())
}

/// `keybroker audit verify`.
pub async fn audit_verify(file: &std::path::Path, cfg: Option<&Config>) -> Result<(), String> {
    use crate::audit::{SETTING_KEY_ID, checkpoint_setting, verify_chain};
    let text = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let (mut v, macs, checkpoints) = verify_chain(&text);
    let mut mode =
        "hash chain only (give --config to check checkpoint MACs in the HSM and truncation)";
    if let Some(cfg) = cfg {
        mode = "hash chain, checkpoint MACs (HSM) and the last recorded checkpoint";
        let (c, f) = (cfg.clone(), file.to_path_buf());
        let (key_id, recorded) = tokio::task::spawn_blocking(move || {
            let store = c.open_store()?;
            let key_id = store.setting(SETTING_KEY_ID).map_err(|e| e.to_string())?;
            let recorded = store
                .setting(&checkpoint_setting(&store, &f))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((key_id, recorded))
        })
        .await
        .map_err(|e| e.to_string())??;
        let key_id = key_id
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| crate::model::VersionId::from_slice(&b))
            .ok_or(
                "the store has no audit key id: was this broker ever started with this config?",
            )?;
        let hsm = crate::server::open_hsm(cfg).await?;
        hsm.ensure_audit_key(Some(key_id))
            .await
            .map_err(|e| e.to_string())?;
        for (line, data, mac) in macs {
            match hsm.audit_verify(data, mac).await {
                Ok(true) => v.macs_verified += 1,
                Ok(false) => v.problems.push(format!(
                    "line {line}: checkpoint MAC does not verify: the records before it were rewritten or the checkpoint forged"
                )),
                Err(e) => return Err(format!("HSM: {e}")),
            }
        }
        if let Some(rec) = recorded
            && !crate::audit::RecordedCheckpoint::parse(&rec)
                .is_some_and(|r| checkpoints.iter().any(|(s, h)| r.is(*s, h)))
        {
            let seq = rec.split(':').next().unwrap_or("?");
            v.problems.push(format!(
                    "the last checkpoint the broker recorded (seq {seq}) is not in the file: the log was truncated or rewritten after line {}",
                    v.lines
                ));
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
    );
    let pending = crate::audit::journal::pending(file);
    if pending > 0 {
        println!(
            "note: the journal {} holds {pending} bytes of answered requests' records that this \
             file lacks (a crash or power failure before they reached the disk through the log); \
             the broker puts them back at its next start",
            crate::audit::journal::path_for(file).display()
        );
    }
    if v.problems.is_empty() {
        println!(
            "audit log OK ({mode}): {} lines, {} checkpoints ({} MACs verified), {} records after the last checkpoint",
            v.lines, v.checkpoints, v.macs_verified, v.unchecked_tail
        );
        Ok(())
    } else {
        for p in &v.problems {
            println!("TAMPERED: {p}");
        }
        Err(format!(
            "audit log {} failed verification ({} problems)",
            file.display(),
            v.problems.len()
        ))
    }
}

#[cfg(test)]
mod table_tests {
    use super::{span, when};

    #[test]
    fn tables_show_times_as_rfc3339_and_durations_in_units() {
        assert_eq!(when(0), "never");
        assert_eq!(when(1_796_394_686_015), "2026-12-04T14:31:26.015Z");
        assert_eq!(span(0), "none");
        assert_eq!(span(90 * 86_400_000), "90d");
        assert_eq!(span(3_723_000), "1h 2m 3s");
        assert_eq!(span(250), "250ms");
    }
}
