//! Selecting the module, token and PIN with a PKCS #11 URI (RFC 7512) instead of `module` +
//! `token_label`/`token_serial`/`slot_id` + `pin_file`, end to end: `check-config` and `serve`
//! find the token the URI names, refuse what it must refuse, and say why.

use keybroker_proto::v1 as pb;

use crate::common::*;

/// Replaces the `module`, `token_label` and `pin_file` lines of the env's config with `uri`.
fn use_uri(env: &Env, uri: &str) {
    env.edit_config(|t| {
        t.lines()
            .filter(|l| {
                !(l.starts_with("module = ")
                    || l.starts_with("token_label = ")
                    || l.starts_with("pin_file = ")
                    || l.starts_with("uri = "))
            })
            .map(|l| {
                if l == "[hsm]" {
                    format!("[hsm]\nuri = \"{uri}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
}

#[tokio::test]
async fn the_token_is_selected_by_a_pkcs11_uri_with_its_pin_from_a_file_or_the_environment() {
    crate::require_aes!();
    let env = Env::new();
    let tokens = env
        .probe_raw(&["tokens", &env.token.module.display().to_string()])
        .expect("hsm-probe tokens");
    let ours = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["label"] == env.token.label.as_str())
        .unwrap_or_else(|| panic!("our token is listed: {tokens:#}"))
        .clone();
    let serial = ours["serial"].as_str().expect("serial").to_string();
    let slot = ours["slot"].as_u64().expect("slot");
    let model = ours["model"].as_str().expect("model").replace(' ', "%20");
    let module = env.token.module.display().to_string();
    let pin_file = env.token.pin_file.display().to_string();

    // Label, serial, slot and model, module and PIN file all in the URI.
    let uri = format!(
        "pkcs11:token={};serial={serial};slot-id={slot};model={model}?module-path={module}&pin-source=file:{pin_file}",
        env.token.label
    );
    use_uri(&env, &uri);
    let report = env
        .check_config()
        .unwrap_or_else(|e| panic!("check-config with {uri}: {e}"));
    assert_eq!(report["token"]["serial"], serial.as_str());
    assert_eq!(report["token"]["label"], env.token.label.as_str());
    assert_eq!(report["hsm_uri"]["selector"]["serial"], serial.as_str());
    assert_eq!(report["hsm_uri"]["selector"]["slot"], slot);
    assert_eq!(report["store"]["kind"], "sqlite");
    let b = env.start().await;
    let mut c = b.clients_as(&env.pki.client).await;
    create(
        &mut c,
        "acme/uri",
        pb::KeyType::Aes256,
        pb::Algorithm::Unspecified,
    )
    .await;
    let dek = random_dek(32);
    let w = wrap(&mut c, "acme/uri", &dek, b"").await.expect("wrap");
    b.stop().await;

    // The PIN from an environment variable (keybroker's pin-source=env:NAME); a vendor query
    // attribute is ignored and reported.
    use_uri(
        &env,
        &format!(
            "pkcs11:serial={serial}?module-path={module}&pin-source=env:KB_TEST_PIN&x-vendor=1"
        ),
    );
    let b = env
        .try_start_with(&[("KB_TEST_PIN", env.token.user_pin.as_str())])
        .await
        .expect("starts with the PIN from the environment");
    let mut c = b.clients_as(&env.pki.client).await;
    let u = unwrap(&mut c, "", &w.wrapped_key, b"")
        .await
        .expect("the same token: the key made before unwraps");
    assert_eq!(u.plaintext, dek);
    b.stop().await;

    // Refusals, each with its reason, from check-config and from serve.
    for (uri, why) in [
        (
            format!(
                "pkcs11:serial={serial}?module-path={module}&pin-value={}",
                env.token.user_pin
            ),
            "pin-value is refused: a PIN is never written inline".to_string(),
        ),
        (
            format!("pkcs11:serial=0000nothere?module-path={module}&pin-source=file:{pin_file}"),
            "no initialized token matches serial \"0000nothere\"".to_string(),
        ),
        (
            format!(
                "pkcs11:serial={serial};library-manufacturer=Nobody?module-path={module}&pin-source=file:{pin_file}"
            ),
            "not the library the PKCS #11 URI names".to_string(),
        ),
        (
            format!(
                "pkcs11:serial={serial};object=k?module-path={module}&pin-source=file:{pin_file}"
            ),
            "hsm.uri names objects (object)".to_string(),
        ),
        (
            format!(
                "pkcs11:serial={serial};x-tier=gold?module-path={module}&pin-source=file:{pin_file}"
            ),
            "path attribute \"x-tier\" is not one keybroker can check".to_string(),
        ),
    ] {
        use_uri(&env, &uri);
        let err = env.check_config().expect_err(&uri);
        assert!(err.contains(&why), "{uri}: {err}");
        let err = match env.try_start().await {
            Ok(b) => {
                b.stop().await;
                panic!("started with {uri}");
            }
            Err(e) => e,
        };
        assert!(err.contains(&why), "{uri}: {err}");
    }
}
