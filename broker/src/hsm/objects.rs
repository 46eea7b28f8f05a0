//! KEK objects: generating them from the fixed template, finding them by `CKA_ID` (one pass
//! over the token for many versions), checking their templates and canaries, caching their
//! handles, reading an RSA version's public half, destroying them.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
};

use cryptoki::{
    error::RvError,
    mechanism::Mechanism,
    object::{Attribute, AttributeType, ObjectClass, ObjectHandle},
    session::Session,
};
use sha2::{Digest, Sha256};

use super::{
    AttachReport, Canary, ExpectedKek, Hsm, Inner, KekHandles, RsaPublic,
    conn::Conn,
    error::{FaultKind, HsmError},
    ops::{self, KwpMechanism, WrapParams},
    pool::{CREATE, MAINTAIN, READ},
    template::{self, KekSpec},
};
use crate::model::{Algorithm, Curve, Origin, VersionId};

/// Unwraps a canary with `h`: `None` if it gives the recorded value, `Some(why)` if not; `Err`
/// when the HSM could not answer.
pub(super) fn canary_verdict(
    inner: &Inner,
    s: &Session,
    h: &KekHandles,
    c: &Canary,
) -> Result<Option<String>, HsmError> {
    let (params, ciphertext, digest) = match c {
        Canary::Wrapped {
            params,
            ciphertext,
            digest,
        } => (params, ciphertext, digest),
        Canary::Signing {
            algorithm,
            fingerprint,
        } => return super::sign::sign_canary_verdict(s, h, *algorithm, fingerprint),
    };
    let kwp = inner.kwp.unwrap_or(KwpMechanism::Pad);
    match ops::unwrap(s, h.secret, kwp, params, ciphertext) {
        Ok(v) if Sha256::digest(v.expose()).as_slice() == digest.as_slice() => Ok(None),
        Ok(_) => Ok(Some(
            "canary decrypts to the wrong value: the HSM object is not the key this version was created with".into(),
        )),
        Err(err) if err.kind == FaultKind::DataInvalid => Ok(Some(
            "canary does not decrypt: the HSM object is not the key this version was created with".into(),
        )),
        Err(err) => Err(err),
    }
}

/// The buffer for a variable-size attribute (an id, a label) read in a pass over the token: a
/// version's id is 16 bytes and its label at most a key name and a version number; a longer
/// value costs one more call, not an error.
const ATTRIBUTE_CAPACITY: usize = 256;

/// Matches expected KEK versions to the token's objects in one pass and, with `templates`,
/// checks each one's template (a re-initialisation defers that to before first use: see
/// `recovery`). Returns the report and the handles of the versions that passed.
pub(super) fn find_keks(
    inner: &Inner,
    s: &Session,
    expected: &[ExpectedKek],
    templates: bool,
) -> Result<(AttachReport, HashMap<VersionId, KekHandles>), HsmError> {
    // One search over the token, not one per class: SoftHSM2 reads every object for each
    // search (~15 µs per object), and this pass is most of a re-initialisation's time.
    // With `templates`, each object's template attributes come in the same read (one
    // C_GetAttributeValue pair per object, not two).
    type Found = (ObjectHandle, ObjectClass, String, Vec<Attribute>);
    let mut by_id: HashMap<Vec<u8>, Vec<Found>> = HashMap::new();
    let mut wanted = vec![
        AttributeType::Class,
        AttributeType::Id,
        AttributeType::Label,
    ];
    if templates {
        wanted.extend_from_slice(template::SECRET_CHECK);
    }
    let found = s
        .find_objects(&[Attribute::Token(true)])
        .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
    for (i, h) in found.into_iter().enumerate() {
        // A pass over a large token takes a second or more: a shutdown does not wait for it.
        if i % 256 == 255 && inner.closed.load(Ordering::SeqCst) {
            return Err(HsmError::refused(
                FaultKind::DeviceLost,
                "find the KEKs",
                "the HSM is closed (shutting down)",
            ));
        }
        // One read per object: a buffer for the id and the label instead of a length query
        // first (SoftHSM2 re-reads the object's file for every call).
        let attrs = match s.get_attributes_sized(h, &wanted, ATTRIBUTE_CAPACITY) {
            Ok(a) => a,
            // Objects that are not keys (Kryoptic lists mechanism and profile objects) may
            // lack these attributes; a key always has them.
            Err(cryptoki::error::Error::Pkcs11(
                RvError::AttributeTypeInvalid | RvError::AttributeSensitive,
                _,
            )) => continue,
            Err(e) => return Err(HsmError::from_ck("C_GetAttributeValue", e)),
        };
        let (mut class, mut id, mut label) = (None, Vec::new(), String::new());
        for a in &attrs {
            match a {
                Attribute::Class(c) => class = Some(*c),
                Attribute::Id(v) => id.clone_from(v),
                Attribute::Label(v) => label = String::from_utf8_lossy(v).into_owned(),
                _ => {}
            }
        }
        match class {
            Some(c)
                if [
                    ObjectClass::SECRET_KEY,
                    ObjectClass::PRIVATE_KEY,
                    ObjectClass::PUBLIC_KEY,
                ]
                .contains(&c) =>
            {
                by_id.entry(id).or_default().push((h, c, label, attrs));
            }
            _ => {}
        }
    }
    let mut report = AttachReport {
        key_objects: by_id.values().map(Vec::len).sum(),
        ..AttachReport::default()
    };
    let mut handles = HashMap::with_capacity(expected.len());
    for e in expected {
        let objs = by_id.remove(e.id.as_bytes().as_slice()).unwrap_or_default();
        let classes: Vec<_> = objs.iter().map(|o| (o.0, o.1)).collect();
        let h = match match_objects(e, &classes) {
            Ok(h) => h,
            Err(p) => {
                report.problems.push((e.id, p));
                continue;
            }
        };
        let Some(mech) = inner.caps.mechanism_for(e.algorithm) else {
            report.problems.push((
                e.id,
                format!(
                    "the token cannot serve its algorithm: {}",
                    inner.caps.why_not(e.algorithm)
                ),
            ));
            continue;
        };
        let problems = if templates {
            let attrs_of = |c: ObjectClass| {
                objs.iter()
                    .find(|o| o.1 == c)
                    .map(|o| o.3.as_slice())
                    .unwrap_or_default()
            };
            let secret_class = if e.key_type.is_pair() {
                ObjectClass::PRIVATE_KEY
            } else {
                ObjectClass::SECRET_KEY
            };
            let imported = e.origin == Origin::Imported;
            let v240 = inner.caps.key_attributes;
            let mut p =
                template::check_secret(e.algorithm, mech, attrs_of(secret_class), imported, v240);
            if h.public.is_some() {
                p.extend(template::check_public(
                    e.algorithm,
                    mech,
                    attrs_of(ObjectClass::PUBLIC_KEY),
                    v240,
                ));
            }
            p
        } else {
            Vec::new()
        };
        if !problems.is_empty() {
            report
                .problems
                .push((e.id, format!("wrong template: {}", problems.join("; "))));
            continue;
        }
        handles.insert(e.id, h);
    }
    for (id, objs) in by_id {
        for (_, _, label, _) in objs {
            if label.starts_with(template::LABEL_PREFIX) {
                report
                    .orphans
                    .push(format!("{label} (CKA_ID {})", hex::encode(&id)));
            }
        }
    }
    report.attached = handles.len();
    Ok((report, handles))
}

/// Picks a version's handles from the key objects that carry its `CKA_ID`: exactly one secret
/// (or private) key, and for RSA exactly one public key; anything else is why not.
pub(super) fn match_objects(
    e: &ExpectedKek,
    objs: &[(ObjectHandle, ObjectClass)],
) -> Result<KekHandles, String> {
    let pick = |c: ObjectClass| -> Vec<ObjectHandle> {
        objs.iter().filter(|o| o.1 == c).map(|o| o.0).collect()
    };
    let (secrets, publics) = if e.key_type.is_pair() {
        (
            pick(ObjectClass::PRIVATE_KEY),
            pick(ObjectClass::PUBLIC_KEY),
        )
    } else {
        (pick(ObjectClass::SECRET_KEY), Vec::new())
    };
    let want_public = usize::from(e.key_type.is_pair());
    match secrets.as_slice() {
        [] if objs.is_empty() => Err(NOTHING_FOUND.to_string()),
        [] => Err("its HSM object is missing (only its public key was found)".to_string()),
        _ if secrets.len() > 1 || publics.len() > want_public || objs.len() != 1 + want_public => {
            Err(format!("{} HSM objects share its CKA_ID", objs.len()))
        }
        _ if publics.len() != want_public => Err("its public key object is missing".to_string()),
        [secret, ..] => Ok(KekHandles {
            secret: *secret,
            public: publics.first().copied(),
        }),
    }
}

/// What a search for a version's objects says when it found no object at all under its id. A
/// storage fault looks the same for every key, so while a pass over the token has not judged
/// (after a re-initialisation) this is not yet a verdict on the key.
pub(super) const NOTHING_FOUND: &str = "its HSM object is missing";

/// Finds one version's objects with a search by its `CKA_ID` (one scan of the token: for a
/// single version, never for all of them). The outer error is an HSM fault, the inner one an
/// integrity problem (missing or duplicated objects).
pub(super) fn find_one(
    s: &Session,
    e: &ExpectedKek,
) -> Result<Result<KekHandles, String>, HsmError> {
    let found = s
        .find_objects(&[
            Attribute::Id(e.id.as_bytes().to_vec()),
            Attribute::Token(true),
        ])
        .map_err(|err| HsmError::from_ck("C_FindObjects", err))?;
    let mut objs = Vec::with_capacity(found.len());
    for h in found {
        let class = s
            .get_attributes(h, &[AttributeType::Class])
            .map_err(|err| HsmError::from_ck("C_GetAttributeValue", err))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Class(c) => Some(c),
                _ => None,
            });
        if let Some(c) = class
            && [
                ObjectClass::SECRET_KEY,
                ObjectClass::PRIVATE_KEY,
                ObjectClass::PUBLIC_KEY,
            ]
            .contains(&c)
        {
            objs.push((h, c));
        }
    }
    Ok(match_objects(e, &objs))
}

pub(super) fn is_key_object(s: &Session, h: ObjectHandle) -> bool {
    matches!(
        s.get_attributes(h, &[AttributeType::Class]).as_deref(),
        Ok([Attribute::Class(c)]) if [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY].contains(c)
    )
}

pub(super) fn check_template(
    s: &Session,
    h: &KekHandles,
    alg: Algorithm,
    mech: cryptoki::mechanism::MechanismType,
    origin: Origin,
    key_attributes: bool,
) -> Result<Vec<String>, HsmError> {
    let attrs = s
        .get_attributes(h.secret, template::SECRET_CHECK)
        .map_err(|e| HsmError::from_ck("read back KEK attributes", e))?;
    let mut problems = template::check_secret(
        alg,
        mech,
        &attrs,
        origin == Origin::Imported,
        key_attributes,
    );
    if let Some(p) = h.public {
        let attrs = s
            .get_attributes(p, template::PUBLIC_CHECK)
            .map_err(|e| HsmError::from_ck("read back public key attributes", e))?;
        problems.extend(template::check_public(alg, mech, &attrs, key_attributes));
    }
    Ok(problems)
}

pub(super) fn destroy_handles(s: &Session, h: &KekHandles) {
    ops::destroy_quietly(s, h.secret);
    if let Some(p) = h.public {
        ops::destroy_quietly(s, p);
    }
}

impl Hsm {
    /// Generates a KEK version inside the token from the fixed template, reads its attributes
    /// back and checks them, and caches its handles. On any failure the new objects are
    /// destroyed. Never retried after a lost session (the object may exist: the caller's
    /// two-phase creation rolls it back by id).
    pub async fn generate_kek(&self, spec: KekSpec) -> Result<(), HsmError> {
        let mech = self
            .inner
            .caps
            .mechanism_for(spec.algorithm)
            .ok_or_else(|| {
                HsmError::new(
                    FaultKind::NotPermitted,
                    "generate a KEK",
                    self.inner.caps.why_not(spec.algorithm),
                )
            })?;
        self.run("generate a KEK", CREATE, move |inner, conn, s| {
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let handles = if spec.algorithm.is_signing() {
                let (pubt, privt) = template::signing_templates(&spec, mech);
                let v240 = inner.caps.key_attributes;
                let (pubt, privt) = (
                    template::for_token(pubt, v240),
                    template::for_token(privt, v240),
                );
                let keygen = if spec.key_type.is_ec() {
                    Mechanism::EccKeyPairGen
                } else {
                    Mechanism::RsaPkcsKeyPairGen
                };
                let (public, private) = s
                    .generate_key_pair(&keygen, &pubt, &privt)
                    .map_err(|e| HsmError::from_ck("C_GenerateKeyPair", e))?;
                KekHandles {
                    secret: private,
                    public: Some(public),
                }
            } else if let Some(bits) = spec.key_type.rsa_bits() {
                let (pubt, privt) = template::rsa_templates(&spec, bits, mech);
                let v240 = inner.caps.key_attributes;
                let (pubt, privt) = (
                    template::for_token(pubt, v240),
                    template::for_token(privt, v240),
                );
                let (public, private) = s
                    .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &pubt, &privt)
                    .map_err(|e| HsmError::from_ck("C_GenerateKeyPair", e))?;
                KekHandles {
                    secret: private,
                    public: Some(public),
                }
            } else {
                let secret = s
                    .generate_key(
                        &Mechanism::AesKeyGen,
                        &template::for_token(
                            template::aes_template(&spec, mech),
                            inner.caps.key_attributes,
                        ),
                    )
                    .map_err(|e| HsmError::from_ck("C_GenerateKey", e))?;
                KekHandles {
                    secret,
                    public: None,
                }
            };
            inner.install(conn, s, &spec, handles, mech, Origin::Generated)?;
            Ok(())
        })
        .await
    }

    /// Destroys every object with this id (an aborted creation, or a purge) and forgets its
    /// handles. Returns how many objects were destroyed.
    pub async fn destroy_kek(&self, id: VersionId) -> Result<usize, HsmError> {
        self.run("destroy a KEK", MAINTAIN, move |inner, conn, s| {
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let found = s
                .find_objects(&[Attribute::Id(id.as_bytes().to_vec())])
                .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
            let mut n = 0;
            for h in found {
                // Kryoptic lists mechanism objects too; only key objects carry our ids, but
                // filter on class to be sure.
                if is_key_object(s, h) {
                    s.destroy_object(h)
                        .map_err(|e| HsmError::from_ck("C_DestroyObject", e))?;
                    n += 1;
                }
            }
            conn.handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            inner.forget(id);
            Ok(n)
        })
        .await
    }

    /// Finds the objects of every expected KEK version in one pass over the token (never one
    /// search per key: `C_FindObjects` costs ~15 µs per object scanned on SoftHSM2), checks
    /// each one's template, and caches the handles of those that pass. They are also the
    /// versions re-found after a re-initialisation.
    pub async fn attach(&self, expected: Vec<ExpectedKek>) -> Result<AttachReport, HsmError> {
        self.run("attach the KEKs", MAINTAIN, move |inner, conn, s| {
            let t = std::time::Instant::now();
            let (report, handles) = find_keks(inner, s, &expected, true)?;
            // The first estimate of a pass's cost for recovery (this one also reads templates).
            inner.search_costs().pass = Some(t.elapsed());
            {
                let mut known = inner.known.write().unwrap_or_else(|p| p.into_inner());
                known.clear();
                for e in &expected {
                    if handles.contains_key(&e.id) {
                        known.insert(e.id, e.clone());
                    }
                }
            }
            *conn.handles.write().unwrap_or_else(|p| p.into_inner()) = handles;
            Ok(report)
        })
        .await
    }

    /// Forgets the handles of a version (it will refuse to serve).
    pub fn detach(&self, id: VersionId) {
        self.inner
            .current()
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.inner.forget(id);
    }

    /// Records the canary of a version (made after its object), so that a re-initialisation
    /// re-checks its identity.
    pub fn set_canary(&self, id: VersionId, canary: Canary) {
        if let Some(e) = self
            .inner
            .known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            e.canary = Some(canary);
        }
    }

    /// Proves many versions' identities in one HSM call (start-up): for each, `None` if its
    /// canary unwraps to the recorded value, else why not. An HSM fault fails the whole call.
    pub async fn check_canaries(
        &self,
        items: Vec<(VersionId, Canary)>,
    ) -> Result<Vec<(VersionId, Option<String>)>, HsmError> {
        let items = Arc::new(items);
        self.run("prove KEK identities", READ, move |inner, conn, s| {
            items
                .iter()
                .map(|(id, c)| {
                    let verdict = match conn.handles_of(*id) {
                        Ok(h) => canary_verdict(inner, s, &h, c)?,
                        Err(_) => Some("its HSM object is not attached".to_string()),
                    };
                    Ok((*id, verdict))
                })
                .collect()
        })
        .await
    }

    /// Reads the public key of an RSA version.
    pub async fn public_key(&self, id: VersionId) -> Result<RsaPublic, HsmError> {
        self.run("read a public key", READ, move |inner, conn, s| {
            inner.ensure_verified(conn, s, id)?;
            let h = conn.handles_of(id)?.public.ok_or_else(|| {
                HsmError::new(
                    FaultKind::NotPermitted,
                    "read a public key",
                    "not an RSA key",
                )
            })?;
            read_rsa_public(s, h)
        })
        .await
    }

    /// Reads the public point of an EC version: the uncompressed point `04 || x || y`.
    pub async fn ec_point(&self, id: VersionId, curve: Curve) -> Result<Vec<u8>, HsmError> {
        self.run("read a public key", READ, move |inner, conn, s| {
            inner.ensure_verified(conn, s, id)?;
            let h = conn.handles_of(id)?.public.ok_or_else(|| {
                HsmError::new(
                    FaultKind::NotPermitted,
                    "read a public key",
                    "not an EC key",
                )
            })?;
            read_ec_point(s, h, curve)
        })
        .await
    }
}

/// The uncompressed point `04 || x || y` of an EC public key object. PKCS#11 says
/// `CKA_EC_POINT` is the DER encoding of an OCTET STRING holding the point; some tokens give
/// the bare point: both are accepted, told apart by their length.
pub(super) fn read_ec_point(
    s: &Session,
    h: ObjectHandle,
    curve: Curve,
) -> Result<Vec<u8>, HsmError> {
    let attrs = s
        .get_attributes(h, &[AttributeType::EcPoint])
        .map_err(|e| HsmError::from_ck("C_GetAttributeValue", e))?;
    let raw = attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .unwrap_or_default();
    let n = 2 * curve.size() + 1;
    let point = if raw.len() == n {
        raw
    } else if raw.len() == n + 2 && raw[0] == 0x04 && usize::from(raw[1]) == n {
        // n is 65 or 97: a one-byte DER length.
        raw[2..].to_vec()
    } else {
        raw
    };
    if point.len() != n || point[0] != 0x04 {
        return Err(HsmError::new(
            FaultKind::Other,
            "read a public key",
            format!(
                "CKA_EC_POINT is not an uncompressed {} point ({} bytes)",
                curve.jwk_name(),
                point.len()
            ),
        ));
    }
    Ok(point)
}

/// The modulus and exponent of an RSA public key object.
pub(super) fn read_rsa_public(s: &Session, h: ObjectHandle) -> Result<RsaPublic, HsmError> {
    {
        {
            let attrs = s
                .get_attributes(h, &[AttributeType::Modulus, AttributeType::PublicExponent])
                .map_err(|e| HsmError::from_ck("C_GetAttributeValue", e))?;
            let mut pk = RsaPublic {
                modulus: Vec::new(),
                exponent: Vec::new(),
            };
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => pk.modulus = m,
                    Attribute::PublicExponent(e) => pk.exponent = e,
                    _ => {}
                }
            }
            if pk.modulus.is_empty() || pk.exponent.is_empty() {
                return Err(HsmError::new(
                    FaultKind::Other,
                    "read a public key",
                    "token returned no modulus/exponent",
                ));
            }
            Ok(pk)
        }
    }
}

impl Inner {
    /// The last step of making a KEK (generated, imported or restored): reads its template back
    /// and checks it (destroying the new objects if the token did not honour it), caches its
    /// handles and remembers it for re-initialisations.
    pub(super) fn install(
        &self,
        conn: &Conn,
        s: &Session,
        spec: &KekSpec,
        handles: KekHandles,
        mech: cryptoki::mechanism::MechanismType,
        origin: Origin,
    ) -> Result<(), HsmError> {
        let problems = check_template(
            s,
            &handles,
            spec.algorithm,
            mech,
            origin,
            self.caps.key_attributes,
        )?;
        if !problems.is_empty() {
            destroy_handles(s, &handles);
            return Err(HsmError::new(
                FaultKind::Setup,
                "check a new KEK's template",
                format!(
                    "the token did not honour the KEK template ({}): {}",
                    origin.as_str(),
                    problems.join("; ")
                ),
            ));
        }
        conn.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id, handles);
        self.remember(ExpectedKek {
            id: spec.id,
            key_type: spec.key_type,
            algorithm: spec.algorithm,
            origin,
            canary: None,
        });
        Ok(())
    }

    /// The handle to use for `params` and the RFC 5649 mechanism, once the version's identity
    /// is proven on this generation (see [`Inner::ensure_verified`]).
    pub(super) fn key_for(
        &self,
        conn: &Conn,
        s: &Session,
        id: VersionId,
        params: &WrapParams,
        wrapping: bool,
    ) -> Result<(ObjectHandle, KwpMechanism), HsmError> {
        self.ensure_verified(conn, s, id)?;
        conn.key_for(self.kwp, id, params, wrapping)
    }
}

impl Hsm {
    /// Whether this process holds handles for a version, or will once the re-find in
    /// progress after a re-initialisation reaches it (a version it knew before is found and
    /// proven again then, or before its first use).
    pub fn has_handles(&self, id: crate::model::VersionId) -> bool {
        let conn = self.inner.current();
        conn.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
            || (conn.resolving()
                && self
                    .inner
                    .known
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&id))
    }

    /// Finds, checks (template and canary) and caches one version's objects. The outer error
    /// is an HSM fault (retry later); the inner one an integrity problem (missing, duplicated,
    /// wrong template, wrong key).
    pub async fn attach_one(&self, e: ExpectedKek) -> Result<Result<(), String>, HsmError> {
        self.run("attach a KEK version", MAINTAIN, move |inner, conn, s| {
            let h = match find_one(s, &e)? {
                Ok(h) => h,
                Err(why) => return Ok(Err(why)),
            };
            let Some(mech) = inner.caps.mechanism_for(e.algorithm) else {
                return Ok(Err(format!(
                    "the token cannot serve its algorithm: {}",
                    inner.caps.why_not(e.algorithm)
                )));
            };
            let problems = check_template(
                s,
                &h,
                e.algorithm,
                mech,
                e.origin,
                inner.caps.key_attributes,
            )?;
            if !problems.is_empty() {
                return Ok(Err(format!("wrong template: {}", problems.join("; "))));
            }
            // Its identity is proven before its handles are cached, in the same call: a
            // request that gives up half way (deadline, hang-up) must not leave an unproven
            // KEK attached. An HSM fault is an error (the refresh is retried), not a verdict.
            let Some(canary) = &e.canary else {
                return Ok(Err("no canary recorded".to_string()));
            };
            if let Some(why) = canary_verdict(inner, s, &h, canary)? {
                return Ok(Err(why));
            }
            conn.handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(e.id, h);
            // Re-found and re-proven after a re-initialisation, like the versions attached at
            // start-up.
            inner.remember(e.clone());
            Ok(Ok(()))
        })
        .await
    }
}
