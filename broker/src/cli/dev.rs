//! `keybroker dev`: a development broker in one command.
//!
//! First run: a SoftHSM2 token (own `softhsm2.conf`, random PINs), a CA with a server
//! certificate for localhost and a client certificate `spiffe://keybroker.dev/cli`, and a
//! config that allows that client — all under the state directory. Every run: start
//! `keybroker serve` as a child process (SoftHSM2 reads `SOFTHSM2_CONF` at start-up, so the
//! child gets the dev token's), create the key `dev/demo` if missing, generate a data key and
//! unwrap it to show the round trip, print how to call the broker, and keep serving until
//! Ctrl-C.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use hsm_fixtures::{
    pki::Ca,
    softhsm::{SoftHsmToken, write_private},
};
use keybroker_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::client::{ClientSettings, clients};

const TOKEN_LABEL: &str = "keybroker-dev";
const CLIENT_ID: &str = "spiffe://keybroker.dev/cli";

struct DevPaths {
    dir: PathBuf,
    config: PathBuf,
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    env_file: PathBuf,
    softhsm_conf: PathBuf,
}

fn abs(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn provision(dir: &Path, listen: SocketAddr) -> Result<DevPaths, String> {
    let dir = abs(dir)?;
    let hsm_dir = dir.join("hsm");
    let pki_dir = dir.join("pki");
    let config = dir.join("keybroker.toml");
    let paths = DevPaths {
        dir: dir.clone(),
        config: config.clone(),
        ca: pki_dir.join("ca.pem"),
        client_cert: pki_dir.join("client.pem"),
        client_key: pki_dir.join("client.key"),
        env_file: dir.join("env.sh"),
        softhsm_conf: hsm_dir.join("softhsm2.conf"),
    };
    let token = if hsm_dir.join("user.pin").exists() {
        SoftHsmToken::open(&hsm_dir, TOKEN_LABEL).map_err(|e| e.to_string())?
    } else {
        eprintln!(
            "keybroker dev: creating a SoftHSM2 token {TOKEN_LABEL:?} in {}",
            hsm_dir.display()
        );
        SoftHsmToken::create(&hsm_dir, TOKEN_LABEL).map_err(|e| e.to_string())?
    };
    if !paths.client_key.exists() {
        eprintln!(
            "keybroker dev: creating a development PKI in {}",
            pki_dir.display()
        );
        let ca = Ca::new(&pki_dir, "ca", "keybroker dev CA").map_err(|e| e.to_string())?;
        ca.issue_localhost_server("server")
            .map_err(|e| e.to_string())?;
        ca.issue_spiffe_client("client", CLIENT_ID)
            .map_err(|e| e.to_string())?;
    }
    let text = format!(
        "# Written by `keybroker dev`. A development configuration: SoftHSM2, loopback only.\n\
         [server]\nlisten = \"{listen}\"\n\n\
         [tls]\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\nclient_ca = \"pki/ca.pem\"\n\n\
         [hsm]\nmodule = \"{module}\"\ntoken_label = \"{TOKEN_LABEL}\"\npin_file = \"hsm/user.pin\"\n\n\
         [store]\npath = \"keybroker.db\"\n\n\
         [lifecycle]\nbackup = true\n\n\
         [access]\nallow = [\"{CLIENT_ID}\"]\n",
        module = token.module.display(),
    );
    std::fs::write(&config, text).map_err(|e| format!("write {}: {e}", config.display()))?;
    let env = format!(
        "# Source this file to point the keybroker CLI at the dev broker.\n\
         export KEYBROKER_ENDPOINT=https://{listen}\n\
         export KEYBROKER_CA_CERT={ca}\n\
         export KEYBROKER_CLIENT_CERT={cert}\n\
         export KEYBROKER_CLIENT_KEY={key}\n\
         export SOFTHSM2_CONF={conf}\n",
        ca = paths.ca.display(),
        cert = paths.client_cert.display(),
        key = paths.client_key.display(),
        conf = paths.softhsm_conf.display(),
    );
    write_private(&paths.env_file, &env).map_err(|e| e.to_string())?;
    Ok(paths)
}

/// Runs the dev broker.
pub async fn run(state_dir: &Path, listen: SocketAddr) -> Result<(), String> {
    let paths = provision(state_dir, listen)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    // The dev token's security officer makes its security domain once (what BackupKey and
    // RestoreKey use); a real deployment's SO runs `keybroker domain init` by hand.
    let marker = paths.dir.join("hsm").join("domain.created");
    if !marker.exists() {
        let out = tokio::process::Command::new(&exe)
            .args(["domain", "init", "--config"])
            .arg(&paths.config)
            .arg("--so-pin-file")
            .arg(paths.dir.join("hsm").join("so.pin"))
            .env("SOFTHSM2_CONF", &paths.softhsm_conf)
            .output()
            .await
            .map_err(|e| format!("cannot run `keybroker domain init`: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("already has a security domain") {
            return Err(format!("`keybroker domain init` failed: {}", stderr.trim()));
        }
        std::fs::write(&marker, &out.stdout)
            .map_err(|e| format!("write {}: {e}", marker.display()))?;
        eprintln!("keybroker dev: created the token's security domain (for key backup/restore)");
    }
    let mut child = tokio::process::Command::new(&exe)
        .arg("serve")
        .arg("--config")
        .arg(&paths.config)
        .env("SOFTHSM2_CONF", &paths.softhsm_conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the broker: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout from the broker")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if let Some(a) = line.strip_prefix("keybroker: listening on ") {
                    break a.trim().to_string();
                }
                println!("{line}");
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = child.wait().await.map_err(|e| e.to_string())?;
                return Err(format!(
                    "the broker exited during start-up ({status}); see the messages above"
                ));
            }
            Err(_) => return Err("the broker did not start within 120 s".into()),
        }
    };
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{line}");
        }
    });

    let endpoint = format!("https://{addr}");
    let settings = ClientSettings {
        endpoint: endpoint.clone(),
        ca: paths.ca.clone(),
        cert: paths.client_cert.clone(),
        key: paths.client_key.clone(),
    };
    demo(&settings).await?;
    let me = exe.display();
    println!(
        "\nkeybroker dev: the broker is serving on {endpoint} (mutual TLS 1.3), SoftHSM2 token {TOKEN_LABEL:?}.\n\
         State (token, PKI, config, database) lives in {dir}; delete it to start over.\n\n\
         Try it from another shell:\n\
         \x20 source {env}\n\
         \x20 {me} key create dev/payments --type aes-256\n\
         \x20 {me} generate-data-key dev/payments --aad order-42\n\
         \x20 {me} wrap dev/payments --plaintext-hex 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n\
         \x20 {me} unwrap <wrapped-base64> [--aad order-42]\n\
         \x20 {me} key rotate dev/payments\n\
         \x20 {me} key create dev/rsa --type rsa-3072 && {me} public-key dev/rsa --format jwk\n\
         \x20 {me} key list --tenant dev\n\
         \x20 {me} key backup dev/payments --out payments.kbbk   # then: key delete, key purge, key restore payments.kbbk\n\n\
         Press Ctrl-C to stop.",
        dir = paths.dir.display(),
        env = paths.env_file.display(),
    );
    tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| e.to_string())?;
            if status.success() { Ok(()) } else { Err(format!("the broker exited: {status}")) }
        }
        _ = crate::server::shutdown_signal() => {
            // Pass SIGTERM on (a terminal's Ctrl-C already reached the whole process group;
            // a second SIGTERM is harmless), then wait for the broker to drain.
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            Ok(())
        }
    }
}

async fn demo(settings: &ClientSettings) -> Result<(), String> {
    let status = |e: tonic::Status| format!("{:?}: {}", e.code(), e.message());
    let mut c = clients(settings).await?;
    match c
        .mgmt
        .create_key(pb::CreateKeyRequest {
            key: "dev/demo".into(),
            key_type: pb::KeyType::Aes256.into(),
            algorithm: pb::Algorithm::Unspecified.into(),
            attributes: None,
            external: None,
            double: None,
        })
        .await
    {
        Ok(_) => println!("demo: created key dev/demo (AES-256, generated inside the HSM)"),
        Err(e) if e.code() == tonic::Code::AlreadyExists => {}
        Err(e) => return Err(format!("demo: CreateKey failed: {}", status(e))),
    }
    let aad = b"demo-context".to_vec();
    let g = c
        .broker
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "dev/demo".into(),
            length: 32,
            aad: aad.clone(),
            context: None,
        })
        .await
        .map_err(|e| format!("demo: GenerateDataKey failed: {}", status(e)))?
        .into_inner();
    let u = c
        .broker
        .unwrap_key(pb::UnwrapKeyRequest {
            key: String::new(),
            aad,
            context: None,
            wrapped: Some(pb::unwrap_key_request::Wrapped::Envelope(
                g.wrapped_key.clone(),
            )),
        })
        .await
        .map_err(|e| format!("demo: UnwrapKey failed: {}", status(e)))?
        .into_inner();
    if u.plaintext != g.plaintext {
        return Err("demo: the unwrapped DEK differs from the generated one".into());
    }
    println!(
        "demo: GenerateDataKey dev/demo -> {}-byte DEK, wrapped into a {}-byte envelope (key version {})",
        g.plaintext.len(),
        g.wrapped_key.len(),
        g.key_version
    );
    println!("demo: UnwrapKey of that envelope -> the same DEK. Round trip OK.");
    Ok(())
}
