//! The security domain: the keys a backup is made and restored with (security invariant 4,
//! `docs/src/security.md`).
//!
//! `keybroker domain init` (the token's security officer) creates, as public token objects
//! sharing one random `CKA_ID` (the domain id):
//!
//! * three or four **domain wrap keys** (AES-256, `kb-domain:wrap-aes-gcm`, `…-aes-kwp`,
//!   `…-rsa-oaep`, and `…-aes-kw` where the token serves RFC 3394 keys), one per KEK role: `CKA_TRUSTED` (so they, and only they, can wrap a KEK created
//!   `CKA_WRAP_WITH_TRUSTED`), wrap + unwrap only, sensitive, never extractable, not modifiable,
//!   and a `CKA_UNWRAP_TEMPLATE` that forces on everything they unwrap the KEK template of
//!   their role: private, sensitive, extractable only under a trusted key, the role's one
//!   operation pair and its one mechanism, no derive/sign/verify, not copyable. So a backup blob
//!   can only come back as a KEK exactly like the one backed up, whoever holds the user PIN —
//!   never as an extractable key, a key that wraps and decrypts (Clulow), or a key of another
//!   role that could use another mechanism on the same material.
//!
//!   `aes-kw` (RFC 3394) KEKs have a role of their own rather than sharing the KWP one, because
//!   the forced template includes `CKA_ALLOWED_MECHANISMS`: under the KWP role's wrap key a KW
//!   KEK would be refused on restore (SoftHSM2) or come back bound to RFC 5649 (Kryoptic), and
//!   letting one role's key restore material for two mechanisms would undo the one-mechanism
//!   rule. The KW role's key is optional: a domain made before `aes-kw` existed, or on a token
//!   without `CKM_AES_KEY_WRAP`, has none and keeps serving the other roles; backing up or
//!   restoring an `aes-kw` KEK under it is refused, saying so.
//! * one **domain MAC key** (HMAC-SHA256, `kb-domain:mac`, sign/verify only) that authenticates
//!   the whole backup blob (metadata and wrapped material).
//!
//! Measured (`softhsm/probes/unwrap-template.sh [kryoptic]`): both tokens enforce the forced
//! template, including `CKA_ALLOWED_MECHANISMS`; SoftHSM2 refuses a template that omits a forced
//! attribute, Kryoptic applies the forced value. `CKA_WRAP_TEMPLATE` (which would stop a domain
//! key from wrapping another role's KEK) is not usable: SoftHSM2 2.6.1 refuses every wrap with
//! it, matching or not, so the unwrap side carries the role separation.

use cryptoki::{
    mechanism::{Mechanism, MechanismType},
    object::{
        Attribute, AttributeArray, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle,
    },
    session::{Session, UserType},
    types::AuthPin,
};
use secrecy::{ExposeSecret, SecretString};

use super::{Hsm, HsmError, KekSpec, RsaPublic, error::FaultKind, template};
use crate::model::{Algorithm, KeyType, VersionId};

/// The label of the domain MAC key.
pub const MAC_LABEL: &str = "kb-domain:mac";
/// Why a token has no domain.
const NO_DOMAIN: &str = "this HSM token has no security domain: its security officer creates one with `keybroker domain init`";

/// A KEK role, each with its own domain wrap key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// AES-256-GCM KEKs (encrypt/decrypt).
    Gcm,
    /// AES key wrap with padding KEKs (wrap/unwrap).
    Kwp,
    /// RSA-OAEP private keys (decrypt).
    Rsa,
    /// AES key wrap (RFC 3394) KEKs (wrap/unwrap); optional (see the module docs).
    Kw,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Gcm, Role::Kwp, Role::Rsa, Role::Kw];

    /// Whether a domain may lack this role's key (the RFC 3394 role came later).
    fn optional(self) -> bool {
        self == Role::Kw
    }

    /// The role of a KEK algorithm.
    pub fn of(alg: Algorithm) -> Role {
        match alg {
            Algorithm::Aes256Gcm => Role::Gcm,
            Algorithm::AesKeyWrapPad => Role::Kwp,
            Algorithm::AesKeyWrap => Role::Kw,
            // A signing key is never extractable and never backed up (`keys::backup` refuses
            // it before the HSM is asked); the RSA role's wrap key could not wrap it anyway.
            Algorithm::RsaOaepSha256 | Algorithm::RsaOaepSha1 | Algorithm::RsaSign => Role::Rsa,
            Algorithm::Ecdsa => Role::Rsa,
        }
    }

    /// The label of the role's domain wrap key.
    pub fn label(self) -> &'static str {
        match self {
            Role::Gcm => "kb-domain:wrap-aes-gcm",
            Role::Kwp => "kb-domain:wrap-aes-kwp",
            Role::Rsa => "kb-domain:wrap-rsa-oaep",
            Role::Kw => "kb-domain:wrap-aes-kw",
        }
    }

    /// A representative KEK of the role (for its template).
    fn sample(self) -> (KeyType, Algorithm) {
        match self {
            Role::Gcm => (KeyType::Aes256, Algorithm::Aes256Gcm),
            Role::Kwp => (KeyType::Aes256, Algorithm::AesKeyWrapPad),
            Role::Rsa => (KeyType::Rsa3072, Algorithm::RsaOaepSha256),
            Role::Kw => (KeyType::Aes256, Algorithm::AesKeyWrap),
        }
    }
}

/// The attributes a role's domain wrap key forces on what it unwraps: every attribute of the
/// role's backup-enabled KEK template that decides what the key can do or become (taken from
/// that template, in its order, so the two cannot drift apart), including not modifiable
/// (else a copy could be given another role afterwards) and destroyable. Not forced: token,
/// label and id, which differ per KEK.
pub fn forced(role: Role, mechanism: MechanismType) -> Vec<Attribute> {
    let (key_type, algorithm) = role.sample();
    let spec = KekSpec {
        id: VersionId::random(),
        label: String::new(),
        key_type,
        algorithm,
        backup: true,
    };
    let t = match key_type.rsa_bits() {
        Some(bits) => template::rsa_templates(&spec, bits, mechanism).1,
        None => template::aes_template(&spec, mechanism),
    };
    template::forced(t)
}

/// The domain's objects, found in the token.
pub(super) struct DomainKeys {
    /// The domain id (the objects' shared `CKA_ID`).
    pub id: VersionId,
    /// The wrap key of each role the domain has.
    pub wrap: Vec<(Role, ObjectHandle)>,
    /// The MAC key.
    pub mac: ObjectHandle,
}

impl DomainKeys {
    /// The wrap key of `role`, or why the domain has none (only an optional role's can be
    /// missing).
    pub fn wrap_key(&self, role: Role) -> Result<ObjectHandle, Refusal> {
        self.wrap
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, h)| *h)
            .ok_or_else(|| {
                format!(
                    "this security domain has no {} key (it was made before aes-kw keys existed, or on a token without CKM_AES_KEY_WRAP): aes-kw keys cannot be backed up or restored under it; make a new domain on a fresh token",
                    role.label()
                )
            })
    }
}

/// What `domain init` made.
#[derive(Clone, Debug)]
pub struct DomainReport {
    /// The domain id.
    pub id: VersionId,
    /// The RFC 5649 mechanism the KWP role is bound to.
    pub kwp_mechanism: String,
    /// The labels of the keys made (the wrap keys, then the MAC key).
    pub created: Vec<&'static str>,
}

/// The domain's objects with this label. Wrap keys are searched with `CKA_TRUSTED` (which only
/// the SO can set) and the MAC key as a private object (which only the user can make), so an
/// object that someone without those rights adds under the same label is not even seen.
fn find_by_label(s: &Session, label: &str) -> Result<Vec<ObjectHandle>, HsmError> {
    let mut t = vec![
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    t.push(if label == MAC_LABEL {
        Attribute::Private(true)
    } else {
        Attribute::Trusted(true)
    });
    s.find_objects(&t)
        .map_err(|e| HsmError::from_ck("C_FindObjects (security domain)", e))
}

/// An object's `CKA_ID` (when 16 bytes) and the boolean attributes asked for.
type IdAndFlags = (Option<VersionId>, Vec<(AttributeType, bool)>);

fn read_bools(
    s: &Session,
    h: ObjectHandle,
    types: &[AttributeType],
) -> Result<IdAndFlags, HsmError> {
    let mut want = vec![AttributeType::Id];
    want.extend_from_slice(types);
    let attrs = s
        .get_attributes(h, &want)
        .map_err(|e| HsmError::from_ck("read the security domain's attributes", e))?;
    let mut id = None;
    let mut out = Vec::new();
    for a in attrs {
        match a {
            Attribute::Id(v) => id = VersionId::from_slice(&v),
            Attribute::Trusted(b)
            | Attribute::Private(b)
            | Attribute::Local(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::NeverExtractable(b)
            | Attribute::Destroyable(b)
            | Attribute::Sensitive(b)
            | Attribute::Extractable(b)
            | Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Modifiable(b)
            | Attribute::Sign(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b) => out.push((a.attribute_type(), b)),
            _ => {}
        }
    }
    Ok((id, out))
}

/// Finds the domain keys and checks them. The outer error is an HSM fault, the inner one says
/// why there is no usable domain (none made yet, incomplete, or not what `domain init` makes).
pub(super) fn find(s: &Session) -> Result<Result<DomainKeys, String>, HsmError> {
    let mut wrap = Vec::with_capacity(Role::ALL.len());
    let mut mac_key = None;
    let mut ids = Vec::with_capacity(Role::ALL.len() + 1);
    let mut absent = 0;
    let keys = Role::ALL.map(Some).into_iter().chain([None]);
    for role in keys {
        let label = role.map_or(MAC_LABEL, Role::label);
        let found = find_by_label(s, label)?;
        let h = match found.as_slice() {
            [] if role.is_some_and(Role::optional) => continue,
            [] => {
                absent += 1;
                continue;
            }
            [h] => *h,
            _ => {
                return Ok(Err(format!(
                    "the token holds {} objects labelled {label}: the security domain is ambiguous",
                    found.len()
                )));
            }
        };
        let mac = role.is_none();
        // Generated inside the token (local, always sensitive, never extractable), not
        // destroyable, not modifiable: not a key someone created with a value they know.
        let common = [
            (AttributeType::Local, true),
            (AttributeType::AlwaysSensitive, true),
            (AttributeType::NeverExtractable, true),
            (AttributeType::Destroyable, false),
        ];
        let own: &[(AttributeType, bool)] = if mac {
            &[
                (AttributeType::Private, true),
                (AttributeType::Sensitive, true),
                (AttributeType::Extractable, false),
                (AttributeType::Sign, true),
                (AttributeType::Encrypt, false),
                (AttributeType::Decrypt, false),
                (AttributeType::Wrap, false),
                (AttributeType::Unwrap, false),
                (AttributeType::Modifiable, false),
            ]
        } else {
            &[
                (AttributeType::Trusted, true),
                (AttributeType::Sensitive, true),
                (AttributeType::Extractable, false),
                (AttributeType::Wrap, true),
                (AttributeType::Unwrap, true),
                (AttributeType::Encrypt, false),
                (AttributeType::Decrypt, false),
                (AttributeType::Modifiable, false),
            ]
        };
        let checks: Vec<(AttributeType, bool)> = common.iter().chain(own).copied().collect();
        let types: Vec<AttributeType> = checks.iter().map(|c| c.0).collect();
        let (id, got) = read_bools(s, h, &types)?;
        for (t, want) in &checks {
            if !got.iter().any(|(gt, gv)| gt == t && gv == want) {
                return Ok(Err(format!(
                    "the security domain's key {label} does not have {t} = {want}: not made by `keybroker domain init`; refusing to use it"
                )));
            }
        }
        let Some(id) = id else {
            return Ok(Err(format!(
                "the security domain's key {label} has no 16-byte CKA_ID"
            )));
        };
        ids.push(id);
        match role {
            Some(r) => wrap.push((r, h)),
            None => mac_key = Some(h),
        }
    }
    // The keys every domain has: the wrap keys of the roles that are not optional, the MAC key.
    let required = Role::ALL.iter().filter(|r| !r.optional()).count() + 1;
    if absent == required && ids.is_empty() {
        return Ok(Err(NO_DOMAIN.into()));
    }
    let (Some(mac), 0) = (mac_key, absent) else {
        return Ok(Err(format!(
            "the token's security domain is incomplete ({absent} of its {required} keys missing)"
        )));
    };
    if ids.windows(2).any(|w| w[0] != w[1]) {
        return Ok(Err(
            "the security domain's keys do not share one CKA_ID: more than one domain, or a partial one"
                .into(),
        ));
    }
    Ok(Ok(DomainKeys {
        id: ids[0],
        wrap,
        mac,
    }))
}

/// A backed-up KEK version: its key material wrapped under the domain, and for RSA the
/// public key (public data; the blob's MAC covers it).
#[derive(Clone, Debug)]
pub struct WrappedVersion {
    /// RFC 5649 of the secret (AES) or private (RSA, PKCS#8) key under the role's domain key.
    pub wrapped: Vec<u8>,
    /// The RSA public key.
    pub public: Option<RsaPublic>,
}

/// Why a backup or restore cannot go ahead (a precondition, not an HSM fault).
pub type Refusal = String;

impl Hsm {
    /// `keybroker domain init`: creates the security domain as the token's security officer.
    /// Refuses if the token already has (part of) one. Blocking; for the CLI, not the broker
    /// (afterwards the user is logged out of this process's sessions).
    pub fn init_domain(&self, so_pin: &SecretString) -> Result<DomainReport, HsmError> {
        let inner = &self.inner;
        let kwp = inner.kwp.ok_or_else(|| {
            HsmError::setup(
                "create the security domain",
                "the token has no usable RFC 5649 mechanism, which a backup needs",
            )
        })?;
        let kwp_type = kwp.mechanism_type();
        let conn = inner.current();
        let s = inner
            .ctx
            .open_rw_session(conn.slot)
            .map_err(|e| HsmError::from_ck("C_OpenSession", e))?;
        match find(&s)? {
            Ok(d) => {
                return Err(HsmError::setup(
                    "create the security domain",
                    format!("this token already has a security domain ({})", d.id),
                ));
            }
            Err(why) if why == NO_DOMAIN => {}
            Err(why) => return Err(HsmError::setup("create the security domain", why)),
        }
        let id = VersionId::random();
        let partial = |what: &str, e: HsmError| {
            HsmError::setup(
                "create the security domain",
                format!(
                    "{what} failed ({e}); the token may now hold part of a domain ({id}), whose keys cannot be destroyed: initialise a fresh token"
                ),
            )
        };
        let so = || AuthPin::new(so_pin.expose_secret().to_string().into());
        let pin = inner.pin();
        let user = || AuthPin::new(pin.expose_secret().to_string().into());
        // 0. Check the SO PIN before making anything (a typo must not leave half a domain).
        let _ = s.logout();
        let so_ok = s
            .login(UserType::So, Some(&so()))
            .map_err(|e| HsmError::from_ck("C_Login (security officer)", e));
        let _ = s.logout();
        s.login(UserType::User, Some(&user()))
            .map_err(|e| HsmError::from_ck("C_Login (user)", e))?;
        so_ok?;
        // 1. The MAC key, as the user: a private object, so that only someone logged in can
        //    MAC (an SO session cannot create private objects).
        s.generate_key(
            &Mechanism::GenericSecretKeyGen,
            &template::hmac_key_template(id, MAC_LABEL, Some(false)),
        )
        .map_err(|e| HsmError::from_ck("create the domain MAC key", e))?;
        // 2. The wrap keys, as the SO (only the SO can set CKA_TRUSTED). The login state is
        //    per application: log the user out, the SO in, and back.
        let _ = s.logout();
        s.login(UserType::So, Some(&so())).map_err(|e| {
            partial(
                "C_Login (security officer)",
                HsmError::from_ck("C_Login", e),
            )
        })?;
        // The RFC 3394 role only where the token serves aes-kw keys (its KEKs are bound to
        // CKM_AES_KEY_WRAP, which the role's key forces on what it restores).
        let kw = inner.caps.mechanism_for(Algorithm::AesKeyWrap);
        let roles: Vec<(Role, MechanismType)> = Role::ALL
            .into_iter()
            .filter_map(|role| match role {
                Role::Gcm => Some((role, MechanismType::AES_GCM)),
                Role::Kwp => Some((role, kwp_type)),
                Role::Rsa => Some((role, MechanismType::RSA_PKCS_OAEP)),
                Role::Kw => kw.map(|m| (role, m)),
            })
            .collect();
        let made = (|| -> Result<(), HsmError> {
            for &(role, mech) in &roles {
                let t = vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(CkKeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Trusted(true),
                    Attribute::Copyable(false),
                    Attribute::Destroyable(false),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(true),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::Derive(false),
                    Attribute::AllowedMechanisms(vec![kwp_type]),
                    Attribute::UnwrapTemplate(AttributeArray::new(forced(role, mech))),
                    Attribute::Id(id.as_bytes().to_vec()),
                    Attribute::Label(role.label().as_bytes().to_vec()),
                    Attribute::Modifiable(false),
                ];
                s.generate_key(&Mechanism::AesKeyGen, &t)
                    .map_err(|e| HsmError::from_ck("create a domain wrap key", e))?;
            }
            Ok(())
        })();
        let _ = s.logout();
        let _ = s.login(UserType::User, Some(&user()));
        made.map_err(|e| partial("creating the wrap keys", e))?;
        Ok(DomainReport {
            id,
            kwp_mechanism: kwp_type.to_string(),
            created: roles
                .iter()
                .map(|(r, _)| r.label())
                .chain([MAC_LABEL])
                .collect(),
        })
    }

    /// The domain id of this token, or why there is no usable domain.
    pub async fn domain_id(&self) -> Result<Result<VersionId, Refusal>, HsmError> {
        self.run(
            "find the security domain",
            super::pool::MAINTAIN,
            move |_, _, s| Ok(find(s)?.map(|d| d.id)),
        )
        .await
    }

    /// Wraps each version's key material under its role's domain key and MACs nothing yet:
    /// returns the domain id and one [`WrappedVersion`] per version, in order. A version that
    /// was not created backup-enabled is refused (inner error).
    pub async fn backup_versions(
        &self,
        versions: Vec<(u32, VersionId, Algorithm)>,
    ) -> Result<Result<(VersionId, Vec<WrappedVersion>), Refusal>, HsmError> {
        let kwp = self.inner.kwp;
        self.run("back up key versions", super::pool::READ, move |inner, conn, s| {
            let domain = match find(s)? {
                Ok(d) => d,
                Err(why) => return Ok(Err(why)),
            };
            let Some(kwp) = kwp else {
                return Ok(Err("the token has no usable RFC 5649 mechanism".into()));
            };
            let mut out = Vec::with_capacity(versions.len());
            for &(number, id, alg) in &versions {
                inner.ensure_verified(conn, s, id)?;
                let h = conn.handles_of(id)?;
                let attrs = s
                    .get_attributes(
                        h.secret,
                        &[AttributeType::Extractable, AttributeType::WrapWithTrusted],
                    )
                    .map_err(|e| HsmError::from_ck("read a KEK's extractability", e))?;
                let backup_enabled = attrs.contains(&Attribute::Extractable(true))
                    && attrs.contains(&Attribute::WrapWithTrusted(true));
                if !backup_enabled {
                    return Ok(Err(format!(
                        "version {number} was created while backup was off ([lifecycle] backup) and can never leave the HSM; rotate, raise the minimum decryption version past it and trim it, then back up"
                    )));
                }
                let wrap_key = match domain.wrap_key(Role::of(alg)) {
                    Ok(k) => k,
                    Err(why) => return Ok(Err(why)),
                };
                let wrapped = s
                    .wrap_key(&kwp.mechanism(), wrap_key, h.secret)
                    .map_err(|e| HsmError::from_ck("C_WrapKey (backup)", e))?;
                let public = match h.public {
                    None => None,
                    Some(p) => {
                        let mut pk = RsaPublic {
                            modulus: Vec::new(),
                            exponent: Vec::new(),
                        };
                        for a in s
                            .get_attributes(
                                p,
                                &[AttributeType::Modulus, AttributeType::PublicExponent],
                            )
                            .map_err(|e| HsmError::from_ck("read a public KEK", e))?
                        {
                            match a {
                                Attribute::Modulus(m) => pk.modulus = m,
                                Attribute::PublicExponent(e) => pk.exponent = e,
                                _ => {}
                            }
                        }
                        Some(pk)
                    }
                };
                out.push(WrappedVersion { wrapped, public });
            }
            Ok(Ok((domain.id, out)))
        })
        .await
    }

    /// Which of these ids already name objects in the token (a restore must not adopt or,
    /// when rolled back, destroy objects it did not make).
    pub async fn ids_in_use(&self, ids: Vec<VersionId>) -> Result<Vec<VersionId>, HsmError> {
        self.run(
            "look for version ids",
            super::pool::MAINTAIN,
            move |_, _, s| {
                let mut used = Vec::new();
                for id in &ids {
                    let found = s
                        .find_objects(&[Attribute::Id(id.as_bytes().to_vec())])
                        .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
                    if found.iter().any(|h| super::objects::is_key_object(s, *h)) {
                        used.push(*id);
                    }
                }
                Ok(used)
            },
        )
        .await
    }

    /// HMAC-SHA256 of `data` under the domain MAC key.
    pub async fn domain_mac(&self, data: Vec<u8>) -> Result<Result<Vec<u8>, Refusal>, HsmError> {
        self.run("MAC a backup", super::pool::READ, move |_, _, s| {
            let domain = match find(s)? {
                Ok(d) => d,
                Err(why) => return Ok(Err(why)),
            };
            s.sign(&Mechanism::Sha256Hmac, domain.mac, &data)
                .map(Ok)
                .map_err(|e| HsmError::from_ck("C_Sign (backup MAC)", e))
        })
        .await
    }

    /// Verifies a backup's MAC under the domain MAC key: Ok(Ok(true)) when authentic.
    pub async fn domain_verify(
        &self,
        data: Vec<u8>,
        mac: Vec<u8>,
    ) -> Result<Result<bool, Refusal>, HsmError> {
        self.run("verify a backup", super::pool::READ, move |_, _, s| {
            let domain = match find(s)? {
                Ok(d) => d,
                Err(why) => return Ok(Err(why)),
            };
            match s.verify(&Mechanism::Sha256Hmac, domain.mac, &data, &mac) {
                Ok(()) => Ok(Ok(true)),
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::SignatureInvalid
                    | cryptoki::error::RvError::SignatureLenRange,
                    _,
                )) => Ok(Ok(false)),
                Err(e) => Err(HsmError::from_ck("C_Verify (backup MAC)", e)),
            }
        })
        .await
    }

    /// Restores one KEK version from a backup: unwraps its material with the role's domain key
    /// into a token object with the KEK template (the domain key forces it too), recreates the
    /// public object of an RSA pair, checks the template and caches the handles. On failure the
    /// new objects are destroyed.
    pub async fn restore_kek(
        &self,
        spec: KekSpec,
        version: WrappedVersion,
        origin: crate::model::Origin,
    ) -> Result<Result<(), Refusal>, HsmError> {
        let mech = self
            .inner
            .caps
            .mechanism_for(spec.algorithm)
            .ok_or_else(|| {
                HsmError::new(
                    FaultKind::NotPermitted,
                    "restore a KEK",
                    self.inner.caps.why_not(spec.algorithm),
                )
            })?;
        let kwp = self.inner.kwp;
        self.run("restore a KEK", super::pool::CREATE, move |inner, conn, s| {
            let _guard = inner.object_lock.lock().unwrap_or_else(|p| p.into_inner());
            let domain = match find(s)? {
                Ok(d) => d,
                Err(why) => return Ok(Err(why)),
            };
            let Some(kwp) = kwp else {
                return Ok(Err("the token has no usable RFC 5649 mechanism".into()));
            };
            let existing = s
                .find_objects(&[Attribute::Id(spec.id.as_bytes().to_vec())])
                .map_err(|e| HsmError::from_ck("C_FindObjects", e))?;
            if !existing.is_empty() {
                return Ok(Err(format!(
                    "the HSM already holds objects with version id {}: the backed-up key still exists (purge it first) or was restored under another name",
                    spec.id
                )));
            }
            let mut spec = spec.clone();
            spec.backup = true;
            let role = Role::of(spec.algorithm);
            let wrap_key = match domain.wrap_key(role) {
                Ok(k) => k,
                Err(why) => return Ok(Err(why)),
            };
            let (template, public_template) = match spec.key_type.rsa_bits() {
                Some(bits) => {
                    let (public, private) = template::rsa_templates(&spec, bits, mech);
                    (private, Some(public))
                }
                None => {
                    let mut t = template::aes_template(&spec, mech);
                    // SoftHSM2 refuses CKA_VALUE_LEN in an unwrap template.
                    t.retain(|a| a.attribute_type() != AttributeType::ValueLen);
                    (t, None)
                }
            };
            let secret = match s.unwrap_key(
                &kwp.mechanism(),
                wrap_key,
                &version.wrapped,
                &template,
            ) {
                Ok(h) => h,
                Err(e) => {
                    let e = HsmError::from_ck_decrypt("C_UnwrapKey (restore)", e);
                    if e.kind == FaultKind::DataInvalid {
                        return Ok(Err(
                            "a version's key material does not unwrap with this security domain's key"
                                .into(),
                        ));
                    }
                    if e.rv == Some(cryptoki::error::RvError::TemplateInconsistent) {
                        return Ok(Err(format!(
                            "the security domain's {} key refuses this broker's KEK template (CKR_TEMPLATE_INCONSISTENT): the domain was made for another template or RFC 5649 mechanism; make a new domain on a fresh token",
                            role.label()
                        )));
                    }
                    return Err(e);
                }
            };
            let public = match (public_template, &version.public) {
                (Some(mut t), Some(pk)) => {
                    t.retain(|a| {
                        !matches!(
                            a.attribute_type(),
                            AttributeType::ModulusBits | AttributeType::PublicExponent
                        )
                    });
                    t.push(Attribute::Modulus(pk.modulus.clone()));
                    t.push(Attribute::PublicExponent(pk.exponent.clone()));
                    match s.create_object(&t) {
                        Ok(h) => Some(h),
                        Err(e) => {
                            super::ops::destroy_quietly(s, secret);
                            return Err(HsmError::from_ck("C_CreateObject (restored public key)", e));
                        }
                    }
                }
                (Some(_), None) => {
                    super::ops::destroy_quietly(s, secret);
                    return Ok(Err("an RSA version in the backup has no public key".into()));
                }
                _ => None,
            };
            let handles = super::KekHandles { secret, public };
            inner.install(conn, s, &spec, handles, mech, origin)?;
            Ok(Ok(()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_forces_its_operations_and_its_one_mechanism_but_not_identity() {
        let gcm = forced(Role::Gcm, MechanismType::AES_GCM);
        for a in [
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::WrapWithTrusted(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Copyable(false),
            Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
            Attribute::Destroyable(true),
        ] {
            assert!(gcm.contains(&a), "{a:?} not forced: {gcm:?}");
        }
        // Not modifiable, and last: SoftHSM2 applies a template in order.
        assert_eq!(gcm.last(), Some(&Attribute::Modifiable(false)));
        for t in [
            AttributeType::Id,
            AttributeType::Label,
            AttributeType::Token,
        ] {
            assert!(!gcm.iter().any(|a| a.attribute_type() == t), "{t:?} forced");
        }
        let kwp = forced(Role::Kwp, MechanismType::AES_KEY_WRAP_PAD);
        assert!(kwp.contains(&Attribute::Wrap(true)) && kwp.contains(&Attribute::Decrypt(false)));
        let rsa = forced(Role::Rsa, MechanismType::RSA_PKCS_OAEP);
        assert!(rsa.contains(&Attribute::Class(ObjectClass::PRIVATE_KEY)));
        assert!(rsa.contains(&Attribute::Decrypt(true)) && rsa.contains(&Attribute::Unwrap(false)));
        assert_eq!(Role::of(Algorithm::RsaOaepSha1), Role::Rsa);
        // RFC 3394 KEKs have their own role: the KWP role's key would force RFC 5649's mechanism.
        assert_eq!(Role::of(Algorithm::AesKeyWrap), Role::Kw);
        let kw = forced(Role::Kw, MechanismType::AES_KEY_WRAP);
        assert!(kw.contains(&Attribute::AllowedMechanisms(vec![
            MechanismType::AES_KEY_WRAP
        ])));
        assert!(kw.contains(&Attribute::Unwrap(true)) && kw.contains(&Attribute::Encrypt(false)));
        assert!(!kwp.contains(&Attribute::AllowedMechanisms(vec![
            MechanismType::AES_KEY_WRAP
        ])));
        assert!(Role::Kw.optional() && !Role::Kwp.optional());
    }
}
