//! The raw PKCS#11 loop: the same operations the broker performs for one request, straight
//! through cryptoki on the broker's own KEK objects, one session per thread — the physical limit
//! the broker is compared with.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    mechanism::{
        Mechanism, MechanismType,
        aead::GcmParams,
        rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource},
    },
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    types::AuthPin,
};

use crate::RawSpec;

const AAD: &[u8] = b"tenant=bench;object=42";

fn oaep(alg: &str) -> Mechanism<'static> {
    let (h, m) = if alg == "rsa-oaep-sha1" {
        (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1)
    } else {
        (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, m, PkcsOaepSource::empty()))
}

fn kwp(s: &Session, kek: ObjectHandle, alg: &str) -> Mechanism<'static> {
    let _ = (s, kek, alg);
    Mechanism::AesKeyWrapPad
}

fn find(s: &Session, id: &[u8]) -> Result<ObjectHandle, String> {
    for class in [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY] {
        let f = s
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
            .map_err(|e| e.to_string())?;
        if let Some(h) = f.first() {
            return Ok(*h);
        }
    }
    Err("KEK not found".into())
}

/// One operation, as the broker does it.
fn step(
    s: &Session,
    kek: ObjectHandle,
    name: &str,
    alg: &str,
    sample: &[u8],
) -> Result<(), String> {
    let e = |x: cryptoki::error::Error| x.to_string();
    match name {
        "aes-gcm unwrap" => {
            let mut iv: [u8; 12] = sample[19..31].try_into().map_err(|_| "short envelope")?;
            let mut aad = sample[..31].to_vec();
            aad.extend_from_slice(AAD);
            let p = GcmParams::new(&mut iv, &aad, 128.into()).map_err(e)?;
            s.decrypt_sized(&Mechanism::AesGcm(p), kek, &sample[31..], sample.len() - 31)
                .map_err(e)?;
        }
        "aes-gcm wrap" | "aes-gcm generate" => {
            let dek = if name.ends_with("generate") {
                s.generate_random_vec(32).map_err(e)?
            } else {
                vec![7u8; 32]
            };
            let mut iv = [0u8; 12];
            getrandom::fill(&mut iv).map_err(|x| x.to_string())?;
            let mut aad = vec![0u8; 31];
            aad.extend_from_slice(AAD);
            let p = GcmParams::new(&mut iv, &aad, 128.into()).map_err(e)?;
            s.encrypt_sized(&Mechanism::AesGcm(p), kek, &dek, dek.len() + 16)
                .map_err(e)?;
        }
        "aes-kwp wrap" => {
            let obj = s
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::Value(vec![7u8; 32]),
                ])
                .map_err(e)?;
            let r = s.wrap_key(&kwp(s, kek, alg), kek, obj);
            let _ = s.destroy_object(obj);
            r.map_err(e)?;
        }
        "aes-kwp unwrap" => {
            let obj = s
                .unwrap_key(
                    &kwp(s, kek, alg),
                    kek,
                    &sample[19..],
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::GENERIC_SECRET),
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Sensitive(false),
                        Attribute::Extractable(true),
                    ],
                )
                .map_err(e)?;
            let v = s.get_attributes(obj, &[AttributeType::Value]);
            let _ = s.destroy_object(obj);
            v.map_err(e)?;
        }
        // What `Sign` asks of the token: CKM_ECDSA over a 32-byte digest; CKM_RSA_PKCS_PSS
        // (SHA-256, MGF1-SHA-256, 32-byte salt) over a 32-byte digest. cryptoki's `sign` makes
        // the length query and the real call, as the broker's does.
        "ecdsa-p256 sign" => {
            s.sign(&Mechanism::Ecdsa, kek, &[7u8; 32]).map_err(e)?;
        }
        "rsa-2048 pss sign" => {
            let pss = Mechanism::RsaPkcsPss(cryptoki::mechanism::rsa::PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32u64.into(),
            });
            s.sign(&pss, kek, &[7u8; 32]).map_err(e)?;
        }
        _ => {
            s.decrypt_sized(&oaep(alg), kek, &sample[19..], sample.len() - 19)
                .map_err(e)?;
        }
    }
    Ok(())
}

/// Serves measurements: reads an operation name per line on stdin, measures it for
/// `spec.seconds` with `spec.threads` sessions (after a short warm-up when the operation
/// changes) and prints its ops/s and CPU µs per op on a line of their own. The bench asks for one measurement just
/// before each of the broker's repetitions of the same row, so both see the host at the same
/// speed (this VM's speed drifts by tens of percent over minutes).
pub fn run(spec_path: &Path) -> Result<(), String> {
    use std::io::{BufRead, Write};
    let spec: RawSpec =
        serde_json::from_slice(&std::fs::read(spec_path).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let ctx = Pkcs11::new(&spec.module).map_err(|e| e.to_string())?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| e.to_string())?;
    let slot = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|t| t.label().trim() == spec.label)
                .unwrap_or(false)
        })
        .ok_or("token not found")?;
    let anchor = ctx.open_rw_session(slot).map_err(|e| e.to_string())?;
    anchor
        .login(UserType::User, Some(&AuthPin::from(spec.pin.clone())))
        .map_err(|e| e.to_string())?;
    let mut last = String::new();
    let mut stdout = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let wanted = line.map_err(|e| e.to_string())?;
        let (name, id, alg, sample) = spec
            .ops
            .iter()
            .find(|op| op.0 == wanted.trim())
            .ok_or_else(|| format!("no raw operation {wanted:?}"))?;
        // One KEK and sample, or comma-separated lists of them (the scale rows: one envelope
        // per key, used in turn like the broker's load does).
        let samples = sample
            .split(',')
            .map(hex::decode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let mut work = Vec::new();
        for (i, id) in id.split(',').enumerate() {
            let kek = find(&anchor, &hex::decode(id).map_err(|e| e.to_string())?)?;
            work.push((kek, samples[i % samples.len()].clone()));
        }
        let work = Arc::new(work);
        // (ops/s, CPU µs per op of this process).
        let measure = |secs: f64| -> Result<(f64, f64), String> {
            let cpu0 = crate::cpu_seconds(std::process::id());
            let stop = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicU64::new(0));
            let mut threads = Vec::new();
            let t0 = Instant::now();
            for t in 0..spec.threads {
                let s = ctx.open_rw_session(slot).map_err(|e| e.to_string())?;
                let (stop, done, work, name, alg) = (
                    stop.clone(),
                    done.clone(),
                    work.clone(),
                    name.clone(),
                    alg.clone(),
                );
                threads.push(std::thread::spawn(move || {
                    let mut i = t * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        let (kek, sample) = &work[i % work.len()];
                        if step(&s, *kek, &name, &alg, sample).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        i += 1;
                    }
                }));
            }
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                let _ = t.join();
            }
            let n = done.load(Ordering::Relaxed) as f64;
            let cpu = crate::cpu_seconds(std::process::id()) - cpu0;
            Ok((
                n / t0.elapsed().as_secs_f64(),
                if n > 0.0 { cpu * 1e6 / n } else { 0.0 },
            ))
        };
        if *name != last {
            measure((spec.seconds / 3.0).max(0.5))?;
            last = name.clone();
        }
        let (rate, cpu) = measure(spec.seconds)?;
        writeln!(stdout, "{rate} {cpu}").map_err(|e| e.to_string())?;
        stdout.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}
