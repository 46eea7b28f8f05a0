//! hsm-probe: a test tool that looks at a token directly through PKCS#11, independently of the
//! broker, and tries the attacks a KEK template must withstand. It prints one JSON document.
//!
//! ```text
//! hsm-probe inspect MODULE LABEL PIN
//!     every key object: class, CKA_ID, label, the security attributes, CKA_ALLOWED_MECHANISMS,
//!     and whether CKA_VALUE (or CKA_PRIVATE_EXPONENT) can be read
//! hsm-probe attack MODULE LABEL PIN ID_HEX
//!     against the KEK with that CKA_ID: Clulow's wrap-then-decrypt, adding a role with
//!     C_SetAttributeValue, copying with added roles via C_CopyObject, reading CKA_VALUE
//! hsm-probe tamper MODULE LABEL PIN ID_HEX destroy|duplicate|replace-bad|replace-good
//!     damage a KEK the way an operator or attacker might, for the start-up integrity tests
//! hsm-probe clear MODULE LABEL PIN
//!     destroy every key and data object the user can see (a reused test token, openCryptoki)
//! hsm-probe tokens MODULE
//!     every slot with an initialised token: slot id, label, serial, manufacturer, model
//! hsm-probe init-token MODULE SLOT LABEL SO_PIN USER_PIN
//!     C_InitToken, SO login, C_InitPIN: how Kryoptic tokens are made (it has no softhsm2-util)
//!
//! Portability (the same key material imported into two tokens must interoperate):
//! hsm-probe import-keys MODULE LABEL PIN FILE
//!     FILE has `name=hex` lines: id, aes (an AES key: CKA_WRAP/CKA_UNWRAP) and n, e, d, p, q,
//!     dp, dq, qinv (an RSA key pair: CKA_ENCRYPT/CKA_DECRYPT); objects get CKA_ID = id
//! hsm-probe kwp-wrap MODULE LABEL PIN ID_HEX DATA_HEX
//! hsm-probe kwp-unwrap MODULE LABEL PIN ID_HEX WRAPPED_HEX
//!     RFC 5649 with the token's mechanism (CKM_AES_KEY_WRAP_KWP if listed, else
//!     CKM_AES_KEY_WRAP_PAD); prints the mechanism used and the result
//! hsm-probe oaep-encrypt MODULE LABEL PIN ID_HEX sha1|sha256 DATA_HEX
//! hsm-probe oaep-decrypt MODULE LABEL PIN ID_HEX sha1|sha256 CIPHERTEXT_HEX
//!
//! PIN rotation (a real PIN change on the token, C_SetPIN as the logged-in user):
//! hsm-probe set-pin MODULE LABEL PIN NEW_PIN
//!
//! BYOK (what the holder of the user PIN can do with a customer's import blob):
//! hsm-probe byok-attack MODULE LABEL PIN IMPORT_ID_HEX sha1|sha256 BLOB_HEX
//!     with the import key's private half (CKA_ID = IMPORT_ID), unwrap the blob under the
//!     attacker's own templates and read what comes out: the blob's RSA-OAEP part into a key
//!     that is not sensitive and extractable; and, for a two-step blob (RSA-OAEP of an
//!     ephemeral AES key, then RFC 5649 of the material), the RFC 5649 part under the ephemeral
//!     key (unwrapped with the broker's own template) the same way. Prints each attempt and
//!     `recovered`: every value read
//! ```
//!
//! SoftHSM2 reads SOFTHSM2_CONF and Kryoptic KRYOPTIC_CONF at start: run this with the token's
//! environment. Kryoptic also lists ~148 CKO_MECHANISM objects in C_FindObjects, so every search
//! here filters by CKA_CLASS.

use std::process::ExitCode;

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    mechanism::{
        Mechanism, MechanismType,
        rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource},
    },
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    types::AuthPin,
};
use serde_json::{Value, json};

const USAGE: &str = "usage: hsm-probe inspect|clear|attack|tamper|tokens|init-token|set-pin|import-keys|kwp-wrap|kwp-unwrap|oaep-encrypt|oaep-decrypt|backup-attack|byok-attack ... (see the source's header)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a.get(1..).unwrap_or_default() {
        ["tokens", module] => tokens(module),
        ["init-token", module, slot, label, so_pin, user_pin] => {
            init_token(module, slot, label, so_pin, user_pin)
        }
        ["set-pin", module, label, pin, new] => open(module, label, pin).and_then(|(s, _)| {
            s.set_pin(
                &AuthPin::from(pin.to_string()),
                &AuthPin::from(new.to_string()),
            )
            .map(|()| json!({ "pin_changed": true }))
            .map_err(|e| format!("C_SetPIN: {e}"))
        }),
        [cmd, module, label, pin, rest @ ..] => {
            open(module, label, pin).and_then(|(s, mechs)| session_command(&s, &mechs, cmd, rest))
        }
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hsm-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn session_command(
    s: &Session,
    mechs: &[MechanismType],
    cmd: &str,
    rest: &[&str],
) -> Result<Value, String> {
    match (cmd, rest) {
        ("inspect", []) => inspect(s),
        ("clear", []) => clear(s),
        ("attack", [id]) => attack(s, id),
        ("tamper", [id, mode]) => tamper(s, id, mode),
        ("import-keys", [file]) => import_keys(s, file),
        ("kwp-wrap", [id, data]) => kwp(s, mechs, id, data, true),
        ("kwp-unwrap", [id, data]) => kwp(s, mechs, id, data, false),
        ("oaep-encrypt", [id, hash, data]) => oaep(s, id, hash, data, true),
        ("oaep-decrypt", [id, hash, data]) => oaep(s, id, hash, data, false),
        ("backup-attack", [id, wrapped]) => backup_attack(s, mechs, id, wrapped),
        ("byok-attack", [id, hash, blob]) => byok_attack(s, mechs, id, hash, blob),
        _ => Err(USAGE.into()),
    }
}

fn init_ctx(module: &str) -> Result<Pkcs11, String> {
    let ctx = Pkcs11::new(module).map_err(|e| format!("load {module}: {e}"))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| e.to_string())?;
    Ok(ctx)
}

fn tokens(module: &str) -> Result<Value, String> {
    let ctx = init_ctx(module)?;
    let mut out = Vec::new();
    for slot in ctx
        .get_slots_with_initialized_token()
        .map_err(|e| e.to_string())?
    {
        let t = ctx.get_token_info(slot).map_err(|e| e.to_string())?;
        out.push(json!({
            "slot": slot.id(),
            "label": t.label().trim(),
            "serial": t.serial_number().trim(),
            "manufacturer": t.manufacturer_id().trim(),
            "model": t.model().trim(),
        }));
    }
    Ok(json!({ "tokens": out }))
}

fn init_token(
    module: &str,
    slot: &str,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<Value, String> {
    let ctx = init_ctx(module)?;
    let id: u64 = slot.parse().map_err(|e| format!("slot {slot:?}: {e}"))?;
    let slot = ctx
        .get_slots_with_token()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|s| s.id() == id)
        .ok_or_else(|| format!("no slot {id}"))?;
    let so = AuthPin::from(so_pin.to_string());
    ctx.init_token(slot, &so, label)
        .map_err(|e| format!("C_InitToken: {e}"))?;
    let s = ctx.open_rw_session(slot).map_err(|e| e.to_string())?;
    s.login(UserType::So, Some(&so))
        .map_err(|e| format!("SO login: {e}"))?;
    s.init_pin(&AuthPin::from(user_pin.to_string()))
        .map_err(|e| format!("C_InitPIN: {e}"))?;
    s.logout().map_err(|e| format!("C_Logout: {e}"))?;
    let t = ctx.get_token_info(slot).map_err(|e| e.to_string())?;
    Ok(json!({ "slot": id, "label": t.label().trim(), "serial": t.serial_number().trim() }))
}

/// Opens a logged-in session on the token labelled `label`; also returns its mechanism list.
fn open(module: &str, label: &str, pin: &str) -> Result<(Session, Vec<MechanismType>), String> {
    let ctx = init_ctx(module)?;
    let slot = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|t| t.label().trim() == label)
                .unwrap_or(false)
        })
        .ok_or_else(|| format!("no token labelled {label:?}"))?;
    let s = ctx.open_rw_session(slot).map_err(|e| e.to_string())?;
    s.login(UserType::User, Some(&AuthPin::from(pin.to_string())))
        .map_err(|e| format!("login: {e}"))?;
    let mechs = ctx.get_mechanism_list(slot).map_err(|e| e.to_string())?;
    Ok((s, mechs))
}

fn clear(s: &Session) -> Result<Value, String> {
    let mut destroyed = 0;
    for class in [
        ObjectClass::SECRET_KEY,
        ObjectClass::PRIVATE_KEY,
        ObjectClass::PUBLIC_KEY,
        ObjectClass::DATA,
    ] {
        for h in s
            .find_objects(&[Attribute::Class(class)])
            .map_err(|e| e.to_string())?
        {
            s.destroy_object(h)
                .map_err(|e| format!("C_DestroyObject: {e}"))?;
            destroyed += 1;
        }
    }
    Ok(json!({ "destroyed": destroyed }))
}

fn key_objects(s: &Session) -> Result<Vec<(ObjectHandle, ObjectClass)>, String> {
    let mut out = Vec::new();
    for class in [
        ObjectClass::SECRET_KEY,
        ObjectClass::PRIVATE_KEY,
        ObjectClass::PUBLIC_KEY,
    ] {
        for h in s
            .find_objects(&[Attribute::Class(class)])
            .map_err(|e| e.to_string())?
        {
            out.push((h, class));
        }
    }
    Ok(out)
}

fn bool_attr(attrs: &[Attribute], t: AttributeType) -> Value {
    for a in attrs {
        if a.attribute_type() == t {
            return match a {
                Attribute::Token(v)
                | Attribute::Private(v)
                | Attribute::Sensitive(v)
                | Attribute::AlwaysSensitive(v)
                | Attribute::Extractable(v)
                | Attribute::NeverExtractable(v)
                | Attribute::WrapWithTrusted(v)
                | Attribute::Modifiable(v)
                | Attribute::Copyable(v)
                | Attribute::Derive(v)
                | Attribute::Sign(v)
                | Attribute::Verify(v)
                | Attribute::Encrypt(v)
                | Attribute::Decrypt(v)
                | Attribute::Wrap(v)
                | Attribute::Unwrap(v) => json!(v),
                _ => Value::Null,
            };
        }
    }
    Value::Null
}

/// Tries to read a secret attribute: "readable", "sensitive", "unavailable" or an error.
fn try_read(s: &Session, h: ObjectHandle, t: AttributeType) -> String {
    match s.get_attribute_info(h, &[t]) {
        Ok(info) => match info.first() {
            Some(cryptoki::object::AttributeInfo::Sensitive) => "sensitive".into(),
            Some(cryptoki::object::AttributeInfo::Available(_)) => {
                match s.get_attributes(h, &[t]) {
                    Ok(v) if !v.is_empty() => "readable".into(),
                    Ok(_) => "unavailable".into(),
                    Err(e) => format!("error: {e}"),
                }
            }
            Some(other) => format!("{other:?}").to_lowercase(),
            None => "unavailable".into(),
        },
        Err(e) => format!("error: {e}"),
    }
}

const FLAGS: &[(&str, AttributeType)] = &[
    ("token", AttributeType::Token),
    ("private", AttributeType::Private),
    ("sensitive", AttributeType::Sensitive),
    ("always_sensitive", AttributeType::AlwaysSensitive),
    ("extractable", AttributeType::Extractable),
    ("never_extractable", AttributeType::NeverExtractable),
    ("wrap_with_trusted", AttributeType::WrapWithTrusted),
    ("modifiable", AttributeType::Modifiable),
    ("copyable", AttributeType::Copyable),
    ("derive", AttributeType::Derive),
    ("sign", AttributeType::Sign),
    ("verify", AttributeType::Verify),
    ("encrypt", AttributeType::Encrypt),
    ("decrypt", AttributeType::Decrypt),
    ("wrap", AttributeType::Wrap),
    ("unwrap", AttributeType::Unwrap),
];

fn inspect(s: &Session) -> Result<Value, String> {
    let mut objects = Vec::new();
    for (h, class) in key_objects(s)? {
        let mut types = vec![
            AttributeType::Id,
            AttributeType::Label,
            AttributeType::AllowedMechanisms,
        ];
        types.extend(FLAGS.iter().map(|f| f.1));
        let attrs: Vec<Attribute> = types
            .iter()
            .filter_map(|t| s.get_attributes(h, &[*t]).ok().and_then(|mut v| v.pop()))
            .collect();
        let mut o = serde_json::Map::new();
        o.insert("class".into(), json!(class.to_string()));
        for a in &attrs {
            match a {
                Attribute::Id(v) => {
                    o.insert("id".into(), json!(hex::encode(v)));
                }
                Attribute::Label(v) => {
                    o.insert("label".into(), json!(String::from_utf8_lossy(v)));
                }
                Attribute::AllowedMechanisms(m) => {
                    let names: Vec<String> = m.iter().map(|m| m.to_string()).collect();
                    o.insert("allowed_mechanisms".into(), json!(names));
                }
                _ => {}
            }
        }
        for (name, t) in FLAGS {
            o.insert((*name).into(), bool_attr(&attrs, *t));
        }
        let secret = if class == ObjectClass::PRIVATE_KEY {
            AttributeType::PrivateExponent
        } else {
            AttributeType::Value
        };
        if class != ObjectClass::PUBLIC_KEY {
            o.insert("value".into(), json!(try_read(s, h, secret)));
        }
        objects.push(Value::Object(o));
    }
    Ok(json!({ "objects": objects }))
}

fn attack(s: &Session, id_hex: &str) -> Result<Value, String> {
    let id = hex::decode(id_hex).map_err(|e| e.to_string())?;
    let kek = find_key(s, &id, ObjectClass::SECRET_KEY)
        .or_else(|_| find_key(s, &id, ObjectClass::PRIVATE_KEY))
        .map_err(|_| "no secret or private key with that id")?;
    // A sensitive, extractable target: what an attacker wants to read.
    let target = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Value(vec![0x42; 32]),
        ])
        .map_err(|e| format!("create target: {e}"))?;
    let outcome = |r: Result<(), String>| match r {
        Ok(()) => json!("succeeded"),
        Err(e) => json!(format!("refused: {e}")),
    };
    // 1. Clulow: wrap the target under the KEK, then decrypt the blob with the same KEK.
    let clulow_result = clulow(s, kek, target).map(|_| ());
    // The same attack against a deliberately bad key (wrap + decrypt) shows the attack code
    // works on this token: it must succeed and give back the target's value.
    let control = (|| -> Result<bool, String> {
        let bad = s
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Wrap(true),
                Attribute::Decrypt(true),
                Attribute::Value(vec![0x17; 32]),
            ])
            .map_err(|e| format!("create control key: {e}"))?;
        let r = clulow(s, bad, target);
        let _ = s.destroy_object(bad);
        r.map(|plain| plain == vec![0x42; 32])
    })();
    // 2. Add the missing role in place.
    let set_attr = s
        .update_attributes(kek, &[Attribute::Wrap(true), Attribute::Decrypt(true)])
        .map_err(|e| format!("C_SetAttributeValue: {e}"));
    // 3. Copy with an added role.
    let copy = (|| -> Result<(), String> {
        let c = s
            .copy_object(
                kek,
                &[
                    Attribute::Token(false),
                    Attribute::Wrap(true),
                    Attribute::Decrypt(true),
                ],
            )
            .map_err(|e| format!("C_CopyObject: {e}"))?;
        let _ = s.destroy_object(c);
        Ok(())
    })();
    // 4. Make it extractable / not sensitive.
    let loosen = s
        .update_attributes(
            kek,
            &[Attribute::Sensitive(false), Attribute::Extractable(true)],
        )
        .map_err(|e| format!("C_SetAttributeValue: {e}"));
    let _ = s.destroy_object(target);
    let secret = if matches!(s.get_attributes(kek, &[AttributeType::Class]).as_deref(), Ok([Attribute::Class(c)]) if *c == ObjectClass::PRIVATE_KEY)
    {
        AttributeType::PrivateExponent
    } else {
        AttributeType::Value
    };
    Ok(json!({
        "control_bad_key_extracts_target": match control { Ok(v) => json!(v), Err(e) => json!(e) },
        "clulow_wrap_then_decrypt": outcome(clulow_result),
        "set_attribute_add_role": outcome(set_attr),
        "copy_object_add_role": outcome(copy),
        "loosen_sensitive_extractable": outcome(loosen),
        "read_value": try_read(s, kek, secret),
    }))
}

/// Wraps `target` under `kek`, then inverts the RFC 3394/5649 wrapping with `kek`'s own
/// AES-ECB decryption, block by block (Clulow's attack); returns the recovered key bytes.
fn clulow(s: &Session, kek: ObjectHandle, target: ObjectHandle) -> Result<Vec<u8>, String> {
    let mut last = String::new();
    // Every AES key-wrap flavour a token may allow the KEK (the last two are RFC 5649 on
    // SoftHSM2 and Kryoptic respectively); the unwrapping below inverts the RFC 3394 core that
    // all of them share.
    for (wrap_mech, name) in [
        (Mechanism::AesKeyWrap, "CKM_AES_KEY_WRAP"),
        (Mechanism::AesKeyWrapPad, "CKM_AES_KEY_WRAP_PAD"),
        (Mechanism::AesKeyWrapKwp, "CKM_AES_KEY_WRAP_KWP"),
    ] {
        let blob = match s.wrap_key(&wrap_mech, kek, target) {
            Ok(b) => b,
            Err(e) => {
                last = format!("C_WrapKey({name}): {e}");
                continue;
            }
        };
        // RFC 3394 section 2.2.2, with C_Decrypt(CKM_AES_ECB) as the block cipher.
        let n = blob.len() / 8 - 1;
        let mut a: [u8; 8] = blob[..8].try_into().map_err(|_| "short blob")?;
        let mut r: Vec<[u8; 8]> = blob[8..]
            .chunks(8)
            .map(|c| c.try_into().unwrap_or([0; 8]))
            .collect();
        for j in (0..6u64).rev() {
            for i in (1..=n).rev() {
                let t = (n as u64) * j + i as u64;
                let mut block = [0u8; 16];
                let at = u64::from_be_bytes(a) ^ t;
                block[..8].copy_from_slice(&at.to_be_bytes());
                block[8..].copy_from_slice(&r[i - 1]);
                let b = s
                    .decrypt(&Mechanism::AesEcb, kek, &block)
                    .map_err(|e| format!("C_Decrypt(CKM_AES_ECB): {e}"))?;
                a.copy_from_slice(&b[..8]);
                r[i - 1].copy_from_slice(&b[8..16]);
            }
        }
        return Ok(r.concat());
    }
    Err(last)
}

fn tamper(s: &Session, id_hex: &str, mode: &str) -> Result<Value, String> {
    let id = hex::decode(id_hex).map_err(|e| e.to_string())?;
    let found = key_objects_with_id(s, &id)?;
    let new_key = |roles: &[Attribute]| -> Result<(), String> {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
            Attribute::Derive(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Id(id.clone()),
            Attribute::Label(b"kb:tampered".to_vec()),
        ];
        t.extend_from_slice(roles);
        s.generate_key(&Mechanism::AesKeyGen, &t)
            .map(|_| ())
            .map_err(|e| format!("C_GenerateKey: {e}"))
    };
    let destroy_all = || -> Result<(), String> {
        for h in &found {
            s.destroy_object(*h)
                .map_err(|e| format!("C_DestroyObject: {e}"))?;
        }
        Ok(())
    };
    let gcm_roles = [
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::AllowedMechanisms(vec![cryptoki::mechanism::MechanismType::AES_GCM]),
    ];
    match mode {
        "destroy" => destroy_all()?,
        "duplicate" => new_key(&gcm_roles)?,
        "replace-bad" => {
            destroy_all()?;
            new_key(&[
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ])?
        }
        "replace-good" => {
            destroy_all()?;
            new_key(&gcm_roles)?
        }
        other => return Err(format!("unknown tamper mode {other:?}")),
    }
    Ok(json!({ "tampered": mode, "objects_before": found.len() }))
}

/// Every key object (secret, private, public) with this CKA_ID. Searching by class keeps
/// Kryoptic's CKO_MECHANISM objects out.
fn key_objects_with_id(s: &Session, id: &[u8]) -> Result<Vec<ObjectHandle>, String> {
    let mut out = Vec::new();
    for class in [
        ObjectClass::SECRET_KEY,
        ObjectClass::PRIVATE_KEY,
        ObjectClass::PUBLIC_KEY,
    ] {
        out.extend(
            s.find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
                .map_err(|e| format!("C_FindObjects: {e}"))?,
        );
    }
    Ok(out)
}

/// The one object of `class` with this CKA_ID.
fn find_key(s: &Session, id: &[u8], class: ObjectClass) -> Result<ObjectHandle, String> {
    let found = s
        .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
        .map_err(|e| format!("C_FindObjects: {e}"))?;
    match found.as_slice() {
        [h] => Ok(*h),
        [] => Err(format!("no {class} with CKA_ID {}", hex::encode(id))),
        more => Err(format!(
            "{} objects of class {class} share CKA_ID {}",
            more.len(),
            hex::encode(id)
        )),
    }
}

fn unhex(what: &str, s: &str) -> Result<Vec<u8>, String> {
    hex::decode(s.trim()).map_err(|e| format!("{what}: not hex: {e}"))
}

/// Imports fixed key material as token objects, so that two tokens hold the same keys. Test
/// keys only: the material was in a file in the clear.
fn import_keys(s: &Session, file: &str) -> Result<Value, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("read {file}: {e}"))?;
    let mut v = std::collections::HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (k, val) = line
            .split_once('=')
            .ok_or_else(|| format!("{file}: line without '=': {line:?}"))?;
        v.insert(k.trim().to_string(), unhex(k, val)?);
    }
    let get = |k: &str| v.get(k).cloned().ok_or_else(|| format!("{file}: no {k}="));
    let id = get("id")?;
    let mut made = Vec::new();
    if let Some(aes) = v.get("aes") {
        s.create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Id(id.clone()),
            Attribute::Label(b"portability:aes".to_vec()),
            Attribute::Value(aes.clone()),
        ])
        .map_err(|e| format!("C_CreateObject(AES): {e}"))?;
        made.push("aes");
    }
    if v.contains_key("n") {
        s.create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(true),
            Attribute::Encrypt(true),
            Attribute::Wrap(false),
            Attribute::Verify(false),
            Attribute::Id(id.clone()),
            Attribute::Label(b"portability:rsa".to_vec()),
            Attribute::Modulus(get("n")?),
            Attribute::PublicExponent(get("e")?),
        ])
        .map_err(|e| format!("C_CreateObject(RSA public): {e}"))?;
        s.create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Id(id.clone()),
            Attribute::Label(b"portability:rsa".to_vec()),
            Attribute::Modulus(get("n")?),
            Attribute::PublicExponent(get("e")?),
            Attribute::PrivateExponent(get("d")?),
            Attribute::Prime1(get("p")?),
            Attribute::Prime2(get("q")?),
            Attribute::Exponent1(get("dp")?),
            Attribute::Exponent2(get("dq")?),
            Attribute::Coefficient(get("qinv")?),
        ])
        .map_err(|e| format!("C_CreateObject(RSA private): {e}"))?;
        made.push("rsa");
    }
    Ok(json!({ "imported": made, "id": hex::encode(&id) }))
}

/// RFC 5649 wrap (of `data` as a generic secret) or unwrap, with the token's own mechanism.
fn kwp(
    s: &Session,
    mechs: &[MechanismType],
    id_hex: &str,
    data_hex: &str,
    wrap: bool,
) -> Result<Value, String> {
    let id = unhex("id", id_hex)?;
    let data = unhex("data", data_hex)?;
    let kek = find_key(s, &id, ObjectClass::SECRET_KEY)?;
    // The token's mechanism list decides which number to use: PKCS#11 3.0's KWP where listed
    // (Kryoptic, Luna), else SoftHSM2's 0x210A, which is RFC 5649 for 8-byte-aligned input.
    let listed = |m: MechanismType| mechs.contains(&m);
    let (mech, name) = if listed(MechanismType::AES_KEY_WRAP_KWP) {
        (Mechanism::AesKeyWrapKwp, "CKM_AES_KEY_WRAP_KWP")
    } else if listed(MechanismType::AES_KEY_WRAP_PAD) {
        (Mechanism::AesKeyWrapPad, "CKM_AES_KEY_WRAP_PAD")
    } else {
        return Err("the token lists no RFC 5649 mechanism".into());
    };
    let out = if wrap {
        let target = s
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Value(data),
            ])
            .map_err(|e| format!("C_CreateObject: {e}"))?;
        let r = s
            .wrap_key(&mech, kek, target)
            .map_err(|e| format!("C_WrapKey({name}): {e}"));
        let _ = s.destroy_object(target);
        r?
    } else {
        let h = s
            .unwrap_key(
                &mech,
                kek,
                &data,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                ],
            )
            .map_err(|e| format!("C_UnwrapKey({name}): {e}"))?;
        let v = s.get_attributes(h, &[AttributeType::Value]);
        let _ = s.destroy_object(h);
        match v.map_err(|e| e.to_string())?.as_slice() {
            [Attribute::Value(v)] => v.clone(),
            _ => return Err("no CKA_VALUE".into()),
        }
    };
    Ok(json!({ "mechanism": name, "output": hex::encode(out) }))
}

fn oaep(
    s: &Session,
    id_hex: &str,
    hash: &str,
    data_hex: &str,
    encrypt: bool,
) -> Result<Value, String> {
    let id = unhex("id", id_hex)?;
    let data = unhex("data", data_hex)?;
    let (h, mgf) = match hash {
        "sha1" => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        "sha256" => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        other => return Err(format!("hash {other:?}: expected sha1 or sha256")),
    };
    let m = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, mgf, PkcsOaepSource::empty()));
    let out = if encrypt {
        let k = find_key(s, &id, ObjectClass::PUBLIC_KEY)?;
        s.encrypt(&m, k, &data)
            .map_err(|e| format!("C_Encrypt(OAEP {hash}): {e}"))?
    } else {
        let k = find_key(s, &id, ObjectClass::PRIVATE_KEY)?;
        s.decrypt(&m, k, &data)
            .map_err(|e| format!("C_Decrypt(OAEP {hash}): {e}"))?
    };
    Ok(json!({ "output": hex::encode(out) }))
}

/// What the holder of the user PIN gets from a customer's BYOK blob (see the header).
fn byok_attack(
    s: &Session,
    mechs: &[MechanismType],
    id_hex: &str,
    hash: &str,
    blob_hex: &str,
) -> Result<Value, String> {
    let id = unhex("id", id_hex)?;
    let blob = unhex("blob", blob_hex)?;
    let (h, mgf) = match hash {
        "sha1" => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        "sha256" => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        other => return Err(format!("hash {other:?}: expected sha1 or sha256")),
    };
    let oaep = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, mgf, PkcsOaepSource::empty()));
    let private = find_key(s, &id, ObjectClass::PRIVATE_KEY)?;
    let k = match s
        .get_attributes(private, &[AttributeType::Modulus])
        .map_err(|e| e.to_string())?
        .as_slice()
    {
        [Attribute::Modulus(m)] => m.len(),
        _ => return Err("the import key has no modulus".into()),
    };
    if blob.len() < k {
        return Err(format!("the blob is shorter than the modulus ({k} bytes)"));
    }
    let (rsa_part, rest) = blob.split_at(k);
    let mut recovered: Vec<String> = Vec::new();
    let mut attempts = serde_json::Map::new();
    // Unwraps `data` with `mech` under `key` and the attacker's template; reads CKA_VALUE.
    let mut steal = |step: &str, mech: &Mechanism, key: ObjectHandle, data: &[u8]| {
        let loose = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ];
        let outcome = match s.unwrap_key(mech, key, data, &loose) {
            Ok(h) => {
                let v = s.get_attributes(h, &[AttributeType::Value]);
                let _ = s.destroy_object(h);
                match v.as_deref() {
                    Ok([Attribute::Value(v)]) if !v.is_empty() => {
                        recovered.push(hex::encode(v));
                        "recovered CKA_VALUE".to_string()
                    }
                    _ => "unwrapped, CKA_VALUE unreadable".into(),
                }
            }
            Err(e) => format!("refused: {e}"),
        };
        attempts.insert(step.into(), json!(outcome));
    };
    steal("rsa_part", &oaep, private, rsa_part);
    if !rest.is_empty() {
        let kwp = if mechs.contains(&MechanismType::AES_KEY_WRAP_KWP) {
            Mechanism::AesKeyWrapKwp
        } else {
            Mechanism::AesKeyWrapPad
        };
        // The ephemeral key as the broker asks for it: sensitive, unwrap only.
        let honest = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Unwrap(true),
            Attribute::Wrap(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ];
        match s.unwrap_key(&oaep, private, rsa_part, &honest) {
            Ok(eph) => {
                steal("kwp_part", &kwp, eph, rest);
                let _ = s.destroy_object(eph);
            }
            Err(e) => {
                attempts.insert(
                    "kwp_part".into(),
                    json!(format!("ephemeral key refused: {e}")),
                );
            }
        }
    }
    Ok(json!({ "attempts": attempts, "recovered": recovered }))
}

/// What a holder of the user PIN can do with a backup-enabled AES-256-GCM KEK (`id`) and its
/// material from a backup blob (`wrapped`, RFC 5649 under the domain's GCM wrap key): wrap the
/// KEK under a key of their own, and unwrap the blob with the domain key under templates that
/// would let them read or misuse the key. Each entry says "refused: ..." or what happened.
fn backup_attack(
    s: &Session,
    mechs: &[MechanismType],
    id_hex: &str,
    wrapped_hex: &str,
) -> Result<Value, String> {
    let id = unhex("id", id_hex)?;
    let wrapped = unhex("wrapped", wrapped_hex)?;
    let kek = find_key(s, &id, ObjectClass::SECRET_KEY)?;
    let mech = if mechs.contains(&MechanismType::AES_KEY_WRAP_KWP) {
        Mechanism::AesKeyWrapKwp
    } else {
        Mechanism::AesKeyWrapPad
    };
    let domain = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"kb-domain:wrap-aes-gcm".to_vec()),
        ])
        .map_err(|e| e.to_string())?
        .first()
        .copied()
        .ok_or("no domain GCM wrap key")?;
    // 1. Wrap the KEK under an untrusted key of our own (then decrypt the blob with it).
    let own = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Decrypt(true),
            ],
        )
        .map_err(|e| format!("generate own key: {e}"))?;
    let wrap_own = match s.wrap_key(&mech, own, kek) {
        Ok(_) => json!("succeeded"),
        Err(e) => json!(format!("refused: {e}")),
    };
    let _ = s.destroy_object(own);
    // The KEK template of the GCM role, as the domain key forces it (token=false: a copy).
    let forced = |allowed: MechanismType, private: bool, modifiable: bool, destroyable: bool| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Private(private),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::WrapWithTrusted(true),
            Attribute::Copyable(false),
            Attribute::Derive(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::AllowedMechanisms(vec![allowed]),
            Attribute::Destroyable(destroyable),
            Attribute::Modifiable(modifiable),
        ]
    };
    let gcm = MechanismType::AES_GCM;
    let try_unwrap = |t: &[Attribute]| -> Value {
        match s.unwrap_key(&mech, domain, &wrapped, t) {
            Ok(h) => {
                let value = try_read(s, h, AttributeType::Value);
                let _ = s.destroy_object(h);
                json!(format!("unwrapped (CKA_VALUE: {value})"))
            }
            Err(e) => json!(format!("refused: {e}")),
        }
    };
    Ok(json!({
        "wrap_under_own_key": wrap_own,
        "unwrap_extractable_not_sensitive": try_unwrap(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ]),
        "unwrap_wrap_and_decrypt": try_unwrap(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Wrap(true),
            Attribute::Decrypt(true),
        ]),
        "unwrap_with_ecb_allowed": try_unwrap(&forced(MechanismType::AES_ECB, true, false, true)),
        "unwrap_public_object": try_unwrap(&forced(gcm, false, false, true)),
        "unwrap_modifiable": try_unwrap(&forced(gcm, true, true, true)),
        "unwrap_indestructible": try_unwrap(&forced(gcm, true, false, false)),
        "add_wrap_to_the_copy": match s.unwrap_key(&mech, domain, &wrapped, &forced(gcm, true, false, true)) {
            Ok(h) => {
                let r = s.update_attributes(h, &[Attribute::Wrap(true)]);
                let _ = s.destroy_object(h);
                match r {
                    Ok(()) => json!("succeeded"),
                    Err(e) => json!(format!("refused: {e}")),
                }
            }
            Err(e) => json!(format!("not unwrapped: {e}")),
        },
        "unwrap_as_forced": try_unwrap(&forced(gcm, true, false, true)),
        "destroy_domain_key": match s.destroy_object(domain) {
            Ok(()) => json!("succeeded"),
            Err(e) => json!(format!("refused: {e}")),
        },
    }))
}
