//! Who may do what: roles modelled on Azure Key Vault Managed HSM's built-in roles, bound to
//! identity patterns and key scopes, deny by default; and the HYOK rules (which identities are
//! the provider's service, which access justifications each key accepts).
//!
//! | role                      | permissions                                                                                         |
//! |---------------------------|-----------------------------------------------------------------------------------------------------|
//! | `administrator`           | read metadata, HYOK connect/disconnect (no key use)                                                 |
//! | `crypto-officer`          | read metadata, delete, recover, purge, restore, trim versions                                       |
//! | `crypto-user`             | read metadata, create, update, rotate, import, backup, wrap, unwrap, encrypt, decrypt, sign, verify, random |
//! | `service-encryption-user` | read metadata, wrap, unwrap                                                                         |
//! | `service-crypto-user`     | read metadata, encrypt, decrypt                                                                     |
//! | `auditor`                 | read metadata, read the audit trail (no key use)                                                    |
//! | `backup`                  | read metadata, backup                                                                               |
//!
//! As in Managed HSM, the crypto user holds every key operation (sign and verify included) and
//! the service encryption user only wrap and unwrap: a calling service that wraps DEKs cannot
//! also decrypt payloads or sign.
//! `service-crypto-user` is the payload counterpart (Managed HSM has no separate built-in role
//! for it): what a cloud KMS calling through an external key store door (AWS XKS) needs, and
//! nothing else.
//!
//! A binding may also name `on_behalf_of`: globs of the upstream principal a cloud front door
//! reports (the AWS principal ARN of an XKS request's `requestMetadata`). Such a binding grants
//! its roles only to requests made on behalf of a matching principal — the XKS API's
//! "secondary authorization" — and never to a request that reports no principal.
//!
//! The policy is a file (see `examples/*-policy.toml`) reloaded on SIGHUP and when its content
//! changes; an invalid file is rejected and the previous policy stays in force.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::model::{Permission, Reason};
use crate::{
    error::{BrokerError, Denied},
    identity::{self, Caller, IdentityKind},
    model::KeyName,
};

/// A built-in role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Roles and security domain; no key use.
    Administrator,
    /// Delete, recover, purge, restore, trim.
    CryptoOfficer,
    /// Create, read, update, rotate, import, backup, wrap, unwrap, encrypt, decrypt, sign,
    /// verify, random.
    CryptoUser,
    /// Read metadata, wrap, unwrap: the role a calling service gets.
    ServiceEncryptionUser,
    /// Read metadata, encrypt, decrypt: the role a cloud KMS behind an external key store door
    /// gets.
    ServiceCryptoUser,
    /// Read metadata and the audit trail; no key use.
    Auditor,
    /// Backup.
    Backup,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 7] = [
        Role::Administrator,
        Role::CryptoOfficer,
        Role::CryptoUser,
        Role::ServiceEncryptionUser,
        Role::ServiceCryptoUser,
        Role::Auditor,
        Role::Backup,
    ];

    /// The role's permissions (the table in the module docs and `docs/src/deployment.md`).
    pub fn permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Role::Administrator => &[ReadMetadata, HyokControl],
            Role::CryptoOfficer => &[ReadMetadata, Delete, Recover, Purge, Restore, TrimVersions],
            Role::CryptoUser => &[
                ReadMetadata,
                Create,
                Update,
                Rotate,
                Import,
                Backup,
                Wrap,
                Unwrap,
                Encrypt,
                Decrypt,
                Sign,
                Verify,
                Random,
            ],
            Role::ServiceEncryptionUser => &[ReadMetadata, Wrap, Unwrap],
            Role::ServiceCryptoUser => &[ReadMetadata, Encrypt, Decrypt],
            Role::Auditor => &[ReadMetadata, ReadAudit],
            Role::Backup => &[ReadMetadata, Backup],
        }
    }
}

/// What a binding covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every key of every tenant, and broker-wide actions.
    All,
    /// Every key of one tenant.
    Tenant(String),
    /// Keys whose full name (`tenant/name`) matches a glob (`*`, `?`).
    Key(String),
}

impl Scope {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Scope::All);
        }
        if let Some(t) = s.strip_prefix("tenant:") {
            crate::model::validate_part("scope tenant", t).map_err(|e| e.to_string())?;
            return Ok(Scope::Tenant(t.to_string()));
        }
        if let Some(g) = s.strip_prefix("key:") {
            if g.is_empty() || !g.contains('/') {
                return Err(format!(
                    "scope {s:?}: a key glob must match \"tenant/name\""
                ));
            }
            return Ok(Scope::Key(g.to_string()));
        }
        Err(format!(
            "scope {s:?}: use \"all\", \"tenant:NAME\" or \"key:GLOB\""
        ))
    }

    fn covers(&self, key: &KeyName) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => t == key.tenant(),
            Scope::Key(g) => glob(g, &key.to_string()),
        }
    }

    fn covers_tenant(&self, tenant: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => t == tenant,
            // A key glob may cover some of the tenant's keys: listing filters per key.
            Scope::Key(g) => {
                let prefix: String = g.chars().take_while(|c| *c != '*' && *c != '?').collect();
                let t = format!("{tenant}/");
                prefix.starts_with(&t) || t.starts_with(&prefix)
            }
        }
    }
}

/// Matches `*` (any run of characters, including `/`) and `?` (one character). Runs on every
/// request: no allocation for ASCII (identities and key names are ASCII in practice).
pub fn glob(pattern: &str, s: &str) -> bool {
    if pattern.is_ascii() && s.is_ascii() {
        return glob_slice(pattern.as_bytes(), s.as_bytes());
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = s.chars().collect();
    glob_slice(&p, &t)
}

fn glob_slice<T: PartialEq + Copy + From<u8>>(p: &[T], t: &[T]) -> bool {
    let (star_c, any_c) = (T::from(b'*'), T::from(b'?'));
    let (mut pi, mut ti) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == any_c || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == star_c {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == star_c {
        pi += 1;
    }
    pi == p.len()
}

/// An identity pattern of the policy, parsed once when the policy loads. Its kind comes from
/// its form and must be the caller's kind as well as its id matching:
///
/// * `spiffe://TRUST-DOMAIN/PATH`: SPIFFE callers. The trust domain is written out (no glob:
///   `spiffe://acme.example*` would also match `spiffe://acme.example.evil/...`). In the path,
///   `*` and `?` match within one segment, never across `/`; a last segment `**` matches one or
///   more whole segments (`spiffe://acme.example/**`: every workload of the trust domain).
/// * `dns:NAME` or a bare `NAME`: DNS-SAN callers; `*` and `?` match within one label, never
///   across `.`.
/// * `unix:...`: local peers of the KMS v2 socket (`unix:uid=N`); `xks:...`: callers an XKS
///   prefix's SigV4 credential authenticated; `ekm:...`: Managed HSM callers of an EKM path
///   prefix (client certificate checked in the handshake). `*` and `?` match any characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityPattern {
    kind: IdentityKind,
    text: String,
}

impl IdentityPattern {
    /// Parses and validates a pattern; `Err` says what was wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() || t.chars().all(|c| c == '*') {
            return Err(format!(
                "identity {text:?} must not be empty or a bare \"*\" (or \"**\")"
            ));
        }
        let (kind, text) = if let Some(rest) = t.strip_prefix("spiffe://") {
            let (td, path) = rest
                .split_once('/')
                .map_or((rest, None), |(a, b)| (a, Some(b)));
            if td.contains(['*', '?']) {
                return Err(format!(
                    "identity {text:?}: write the trust domain out (a glob in it would \
                     also match other trust domains)"
                ));
            }
            identity::check_trust_domain(td).map_err(|e| format!("identity {text:?}: {e}"))?;
            if let Some(path) = path {
                let segs: Vec<&str> = path.split('/').collect();
                for (i, seg) in segs.iter().enumerate() {
                    if *seg == "**" && i + 1 == segs.len() {
                        continue;
                    }
                    if seg.contains("**") {
                        return Err(format!(
                            "identity {text:?}: \"**\" may only be the whole last segment"
                        ));
                    }
                    identity::check_path_segment(&seg.replace(['*', '?'], "x"))
                        .map_err(|e| format!("identity {text:?}: {e}"))?;
                }
            }
            (IdentityKind::Spiffe, t.to_string())
        } else if t.starts_with("unix:") {
            (IdentityKind::Unix, t.to_string())
        } else if t.starts_with("xks:") {
            (IdentityKind::SigV4, t.to_string())
        } else if t.starts_with("ekm:") {
            (IdentityKind::Ekm, t.to_string())
        } else {
            let name = t.strip_prefix("dns:").unwrap_or(t);
            if name.contains(':') || name.contains('/') {
                return Err(format!(
                    "identity {text:?}: not a SPIFFE ID (spiffe://...), a DNS name (dns:... or \
                     bare), unix:..., xks:... or ekm:..."
                ));
            }
            let lower = name.to_ascii_lowercase();
            for label in lower.split('.') {
                identity::check_dns_label(label, true)
                    .map_err(|e| format!("identity {text:?}: {e}"))?;
            }
            (IdentityKind::Dns, lower)
        };
        Ok(Self { kind, text })
    }

    /// The pattern that names exactly this caller (a door's own grant to its peer).
    pub fn exact(caller: &Caller) -> Self {
        Self {
            kind: caller.kind,
            text: caller.id.clone(),
        }
    }

    /// Whether the caller is of this pattern's kind and its id matches.
    pub fn matches(&self, caller: &Caller) -> bool {
        if caller.kind != self.kind {
            return false;
        }
        match self.kind {
            IdentityKind::Spiffe => {
                let mut p = self.text.split('/');
                let mut c = caller.id.split('/');
                loop {
                    match (p.next(), c.next()) {
                        (None, None) => return true,
                        (Some("**"), Some(_)) if p.clone().next().is_none() => return true,
                        (Some(ps), Some(cs)) if glob(ps, cs) => {}
                        _ => return false,
                    }
                }
            }
            IdentityKind::Dns => {
                let mut p = self.text.split('.');
                let mut c = caller.id.split('.');
                loop {
                    match (p.next(), c.next()) {
                        (None, None) => return true,
                        (Some(pl), Some(cl)) if glob(pl, cl) => {}
                        _ => return false,
                    }
                }
            }
            IdentityKind::Unix | IdentityKind::SigV4 | IdentityKind::Ekm => {
                glob(&self.text, &caller.id)
            }
        }
    }
}

impl std::fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The cloud request a request serves, as the front door that carried it reports it (an AWS
/// XKS request's `requestMetadata`). Authenticated only as far as the door authenticated the
/// caller (SigV4 covers the body): it says on whose behalf a trusted cloud service calls. In
/// the audit record, and matched by bindings' `on_behalf_of`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// The principal that called the cloud KMS (`awsPrincipalArn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The cloud KMS operation that led to this request (`kmsOperation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// The cloud KMS's request id (`kmsRequestId`), to correlate with its own log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The cloud service that called the KMS for the principal (`kmsViaService`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_service: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    binding: Vec<BindingFile>,
    #[serde(default)]
    hyok: Option<HyokFile>,
    #[serde(default)]
    platform: Option<PlatformFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlatformFile {
    identities: Vec<String>,
    #[serde(default = "default_platform_key")]
    default_key: String,
    #[serde(default = "default_platform_algorithm")]
    algorithm: String,
    #[serde(default = "default_platform_rotation")]
    rotation_period_ms: i64,
}

fn default_platform_key() -> String {
    "default".into()
}
fn default_platform_algorithm() -> String {
    crate::model::Algorithm::Aes256Gcm.as_str().into()
}
fn default_platform_rotation() -> i64 {
    PLATFORM_ROTATION_MS
}

/// The default rotation period of platform-managed keys: 90 days (Managed HSM's and the
/// clouds' usual default for service-managed keys).
pub const PLATFORM_ROTATION_MS: i64 = 90 * 24 * 3600 * 1000;

/// The tag every platform-managed key is created with (`managed-by = platform`).
pub const PLATFORM_TAG: (&str, &str) = ("managed-by", "platform");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingFile {
    identity: String,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    roles: Vec<Role>,
    scope: String,
    #[serde(default)]
    on_behalf_of: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HyokFile {
    #[serde(default)]
    service_identities: Vec<String>,
    #[serde(default)]
    customer_identities: Option<Vec<String>>,
    #[serde(default)]
    default_accepted_reasons: Option<Vec<Reason>>,
    #[serde(default)]
    key: Vec<HyokKeyFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HyokKeyFile {
    keys: String,
    accepted_reasons: Vec<Reason>,
}

/// One binding: identity pattern × roles × scope.
#[derive(Clone, Debug)]
pub struct Binding {
    /// Exact identity or pattern.
    pub identity: IdentityPattern,
    /// The roles granted.
    pub roles: Vec<Role>,
    /// Where.
    pub scope: Scope,
    /// Globs of the upstream principal the request must be made on behalf of (empty: any
    /// request, with or without one).
    pub on_behalf_of: Vec<String>,
}

/// The HYOK rules.
#[derive(Clone, Debug, Default)]
pub struct HyokRules {
    /// Identity patterns that are the provider's, whatever else matches them.
    pub service_identities: Vec<IdentityPattern>,
    /// Identity patterns of the customer's own identities (`None`: the identities the policy
    /// gives the HYOK switch permission, i.e. the `administrator` role, are the customer's).
    /// Every other identity is a provider identity: subject to the kill switch and the
    /// justification rules in every request.
    pub customer_identities: Option<Vec<IdentityPattern>>,
    /// Reasons accepted for keys that match no per-key entry (`None` = any reason).
    pub default_accepted: Option<BTreeSet<Reason>>,
    /// Per key glob, the accepted reasons (first match wins).
    pub keys: Vec<(String, BTreeSet<Reason>)>,
}

/// The platform-managed key model: the provider's platform identities get each tenant's
/// default key (`<tenant>/<default_key>`) without asking for it — created inside the HSM on
/// first use, rotated by the default policy — and the name is reserved: no other identity may
/// create, import, restore, update, trim, back up, delete or purge it.
#[derive(Clone, Debug)]
pub struct PlatformRules {
    /// The platform's identities.
    pub identities: Vec<IdentityPattern>,
    /// The name of every tenant's default key.
    pub default_key: String,
    /// The algorithm the default keys are created with (an AES-256 one).
    pub algorithm: crate::model::Algorithm,
    /// Their automatic rotation period (ms).
    pub rotation_period_ms: i64,
}

/// A platform-managed key to create on first use ([`Authorizer::platform_key`]).
#[derive(Clone, Debug)]
pub struct PlatformKey {
    /// The grant to create it.
    pub grant: Grant,
    /// Its algorithm.
    pub algorithm: crate::model::Algorithm,
    /// Its rotation period (ms).
    pub rotation_period_ms: i64,
}

impl PlatformKey {
    /// The operations it allows: every one its first use may be (wrap, generate a data key,
    /// encrypt) and their inverses, so whichever the platform uses first, the key serves the
    /// rest. Payload encryption only where the algorithm has it (`aes-kwp` wraps keys only).
    pub fn operations(&self) -> std::collections::BTreeSet<crate::model::KeyOp> {
        use crate::model::KeyOp;
        let payload = [KeyOp::Encrypt, KeyOp::Decrypt]
            .into_iter()
            .filter(|_| !self.algorithm.is_key_wrap());
        KeyOp::DEFAULT.into_iter().chain(payload).collect()
    }
}

/// What only the platform may do to a platform-managed key: everything that makes, replaces,
/// changes, exports or destroys it. Using it (wrap, unwrap, read, rotate) is left to the roles.
const PLATFORM_ONLY: [Permission; 8] = [
    Permission::Create,
    Permission::Import,
    Permission::Restore,
    Permission::Update,
    Permission::TrimVersions,
    Permission::Backup,
    Permission::Delete,
    Permission::Purge,
];

impl PlatformRules {
    /// Whether `key` is a tenant's platform-managed key.
    pub fn reserves(&self, key: &KeyName) -> bool {
        key.name() == self.default_key
    }

    /// Whether `caller` is the platform.
    pub fn is_platform(&self, caller: &Caller) -> bool {
        self.identities.iter().any(|p| p.matches(caller))
    }

    fn parse(f: PlatformFile) -> Result<Self, String> {
        use crate::model::{Algorithm, KeyType, validate_part};
        if f.identities.is_empty() {
            return Err("[platform] identities is empty: name the platform's identities".into());
        }
        let identities = f
            .identities
            .iter()
            .map(|p| IdentityPattern::parse(p).map_err(|e| format!("[platform] identities: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        validate_part("[platform] default_key", &f.default_key).map_err(|e| e.to_string())?;
        let algorithm = Algorithm::parse(&f.algorithm)
            .filter(|a| a.fits(KeyType::Aes256))
            .ok_or_else(|| {
                format!(
                    "[platform] algorithm {:?}: expected an AES-256 algorithm (aes-256-gcm or aes-kwp)",
                    f.algorithm
                )
            })?;
        if f.rotation_period_ms < 1000 {
            return Err(format!(
                "[platform] rotation_period_ms {}: expected at least 1000",
                f.rotation_period_ms
            ));
        }
        Ok(Self {
            identities,
            default_key: f.default_key,
            algorithm,
            rotation_period_ms: f.rotation_period_ms,
        })
    }
}

/// A validated policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The bindings.
    pub bindings: Vec<Binding>,
    /// HYOK rules, if this broker runs the HYOK model.
    pub hyok: Option<HyokRules>,
    /// The platform-managed key model, if the provider runs it.
    pub platform: Option<PlatformRules>,
}

impl Policy {
    /// Parses and validates a policy file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut bindings = Vec::new();
        for (i, b) in f.binding.into_iter().enumerate() {
            let n = i + 1;
            let identity =
                IdentityPattern::parse(&b.identity).map_err(|e| format!("binding {n}: {e}"))?;
            let mut roles = b.roles;
            roles.extend(b.role);
            if roles.is_empty() {
                return Err(format!(
                    "binding {n} ({}): give `role` or `roles`",
                    b.identity
                ));
            }
            let scope =
                Scope::parse(&b.scope).map_err(|e| format!("binding {n} ({}): {e}", b.identity))?;
            if b.on_behalf_of
                .iter()
                .any(|g| g.trim().is_empty() || g == "*")
            {
                return Err(format!(
                    "binding {n} ({}): on_behalf_of entries must not be empty or a bare \"*\" \
                     (leave on_behalf_of out to match every request)",
                    b.identity
                ));
            }
            bindings.push(Binding {
                identity,
                roles,
                scope,
                on_behalf_of: b.on_behalf_of,
            });
        }
        let hyok = match f.hyok {
            None => None,
            Some(h) => {
                if h.customer_identities.as_ref().is_some_and(Vec::is_empty) {
                    return Err(
                        "[hyok] customer_identities is empty: nobody could reconnect \
                         the switch; list the customer's identities, or leave the key out to \
                         make the administrators the customer"
                            .into(),
                    );
                }
                let patterns = |v: Vec<String>, what: &str| {
                    v.iter()
                        .map(|p| {
                            IdentityPattern::parse(p).map_err(|e| format!("[hyok] {what}: {e}"))
                        })
                        .collect::<Result<Vec<_>, String>>()
                };
                Some(HyokRules {
                    service_identities: patterns(h.service_identities, "service_identities")?,
                    customer_identities: h
                        .customer_identities
                        .map(|v| patterns(v, "customer_identities"))
                        .transpose()?,
                    default_accepted: h.default_accepted_reasons.map(|v| v.into_iter().collect()),
                    keys: h
                        .key
                        .into_iter()
                        .map(|k| (k.keys, k.accepted_reasons.into_iter().collect()))
                        .collect(),
                })
            }
        };
        let platform = f.platform.map(PlatformRules::parse).transpose()?;
        Ok(Self {
            bindings,
            hyok,
            platform,
        })
    }

    /// The policy of a plain allow-list: each listed identity gets every role on everything.
    pub fn allow_all(identities: &[String]) -> Result<Self, String> {
        let bindings = identities
            .iter()
            .map(|i| {
                Ok(Binding {
                    identity: IdentityPattern::parse(i)
                        .map_err(|e| format!("access.allow: {e}"))?,
                    roles: Role::ALL.to_vec(),
                    scope: Scope::All,
                    on_behalf_of: Vec::new(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            bindings,
            hyok: None,
            platform: None,
        })
    }

    /// The bindings that name the caller and whose `on_behalf_of` (if any) matches the
    /// upstream principal the request reports.
    fn matching<'a>(
        &'a self,
        caller: &'a Caller,
        upstream: Option<&'a Upstream>,
    ) -> impl Iterator<Item = &'a Binding> + 'a {
        let principal = upstream.and_then(|u| u.principal.as_deref());
        self.bindings.iter().filter(move |b| {
            b.identity.matches(caller)
                && (b.on_behalf_of.is_empty()
                    || principal.is_some_and(|p| b.on_behalf_of.iter().any(|g| glob(g, p))))
        })
    }

    /// Whether the caller holds `perm` on `key`.
    pub fn allows(&self, caller: &Caller, perm: Permission, key: &KeyName) -> bool {
        self.allows_for(caller, None, perm, key)
    }

    /// Whether the caller, on behalf of `upstream`, holds `perm` on `key`.
    pub fn allows_for(
        &self,
        caller: &Caller,
        upstream: Option<&Upstream>,
        perm: Permission,
        key: &KeyName,
    ) -> bool {
        self.matching(caller, upstream)
            .any(|b| b.scope.covers(key) && b.roles.iter().any(|r| r.permissions().contains(&perm)))
    }

    /// Whether the caller holds `perm` on something in `tenant` (listing then filters per key).
    pub fn allows_in_tenant(&self, caller: &Caller, perm: Permission, tenant: &str) -> bool {
        self.matching(caller, None).any(|b| {
            b.scope.covers_tenant(tenant) && b.roles.iter().any(|r| r.permissions().contains(&perm))
        })
    }

    /// Whether the caller holds `perm` broker-wide (scope `all`).
    pub fn allows_global(&self, caller: &Caller, perm: Permission) -> bool {
        self.matching(caller, None).any(|b| {
            b.scope == Scope::All && b.roles.iter().any(|r| r.permissions().contains(&perm))
        })
    }

    /// Whether the caller holds `perm` with some scope.
    pub fn allows_somewhere(&self, caller: &Caller, perm: Permission) -> bool {
        self.matching(caller, None)
            .any(|b| b.roles.iter().any(|r| r.permissions().contains(&perm)))
    }

    /// Whether the caller may call at all (a binding names its identity, whatever it says of
    /// upstream principals: a request that reports none, such as an XKS health check, is still
    /// the caller's).
    pub fn knows(&self, caller: &Caller) -> bool {
        self.bindings.iter().any(|b| b.identity.matches(caller))
    }

    /// Whether the caller is a provider identity of the HYOK model: listed among the service
    /// identities, or not the customer's (fail closed: an identity nobody classified is the
    /// provider's). Always false without a `[hyok]` section.
    pub fn is_provider(&self, caller: &Caller) -> bool {
        let Some(h) = &self.hyok else { return false };
        if h.service_identities.iter().any(|p| p.matches(caller)) {
            return true;
        }
        // Fail closed: whoever is not the customer's is the provider's.
        let customer = match &h.customer_identities {
            Some(patterns) => patterns.iter().any(|p| p.matches(caller)),
            None => self.matching(caller, None).any(|b| {
                b.roles
                    .iter()
                    .any(|r| r.permissions().contains(&Permission::HyokControl))
            }),
        };
        !customer
    }

    /// Checks a HYOK service identity's justification for `key`. `Err` names what was wrong.
    pub fn check_justification(&self, key: &KeyName, reason: Option<Reason>) -> Result<(), Denied> {
        let Some(h) = &self.hyok else { return Ok(()) };
        let Some(reason) = reason else {
            return Err(Denied::NoJustification);
        };
        let full = key.to_string();
        let accepted = h
            .keys
            .iter()
            .find(|(g, _)| glob(g, &full))
            .map(|(_, r)| Some(r))
            .unwrap_or(h.default_accepted.as_ref());
        match accepted {
            Some(set) if !set.contains(&reason) => Err(Denied::Justification {
                key: key.clone(),
                reason,
            }),
            _ => Ok(()),
        }
    }
}

/// Proof that this request's caller holds one permission on one key: the keyring's operations
/// take one, and only [`Authorizer::grant`] makes them, after the role × scope decision and the
/// HYOK rules. A grant lives as long as its request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    key: KeyName,
    permission: Permission,
}

impl Grant {
    /// The key.
    pub fn key(&self) -> &KeyName {
        &self.key
    }

    /// The permission granted.
    pub fn permission(&self) -> Permission {
        self.permission
    }

    /// The key, if this grant is for `permission`. Anything else is a bug in the caller (an
    /// operation acting on a grant made for another one), refused as such.
    pub fn key_for(&self, permission: Permission) -> Result<&KeyName, BrokerError> {
        if self.permission == permission {
            Ok(&self.key)
        } else {
            Err(BrokerError::internal(format!(
                "a grant to {} key {} used to {permission}",
                self.permission, self.key
            )))
        }
    }
}

/// The permissions one request has: the policy in force when it arrived (with the binding of
/// the front door it came through, if any), its verified caller, and the HYOK rules — the kill
/// switch and the access justification. Every decision of the request is made here, deny by
/// default.
pub struct Authorizer {
    policy: Arc<Policy>,
    caller: Caller,
    hyok: Arc<crate::hyok::HyokSwitch>,
    reason: Option<Reason>,
    upstream: Option<Upstream>,
    provider: bool,
}

impl Authorizer {
    /// The authority of `caller` under `policy`, plus `door` (a binding the front door itself
    /// grants its callers, e.g. the Kubernetes KMS v2 socket's one key).
    pub fn new(
        policy: Arc<Policy>,
        caller: Caller,
        door: Option<Binding>,
        hyok: Arc<crate::hyok::HyokSwitch>,
    ) -> Self {
        let policy = match door {
            None => policy,
            Some(b) => {
                let mut p = (*policy).clone();
                p.bindings.push(b);
                Arc::new(p)
            }
        };
        let provider = policy.is_provider(&caller);
        Self {
            policy,
            caller,
            hyok,
            reason: None,
            upstream: None,
            provider,
        }
    }

    /// The HYOK rules for the whole request, before its operation runs: a provider identity is
    /// refused every operation while the switch is off, and must give an access justification.
    pub fn admit(&self) -> Result<(), BrokerError> {
        if !self.provider {
            return Ok(());
        }
        if !self.hyok.connected() {
            return Err(Denied::HyokDisconnected.into());
        }
        if self.reason.is_none() {
            return Err(Denied::NoJustification.into());
        }
        Ok(())
    }

    /// The verified caller.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The access justification the request gave (checked for HYOK service identities).
    pub fn set_reason(&mut self, reason: Option<Reason>) {
        self.reason = reason;
    }

    /// The upstream request this request serves (see [`Upstream`]): its principal then
    /// decides which bindings with `on_behalf_of` apply.
    pub fn set_upstream(&mut self, upstream: Upstream) {
        self.upstream = Some(upstream);
    }

    /// The upstream request, if the front door reported one.
    pub fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_ref()
    }

    /// Whether the caller may call at all (any binding names it).
    pub fn knows(&self) -> bool {
        self.policy.knows(&self.caller)
    }

    /// Whether the caller (on behalf of the upstream principal, if any) holds `perm` on `key`
    /// (role × scope only: for filtering lists).
    pub fn allows(&self, perm: Permission, key: &KeyName) -> bool {
        self.policy
            .allows_for(&self.caller, self.upstream.as_ref(), perm, key)
    }

    /// Whether the caller holds `perm` on something in `tenant` (listing then filters per key).
    pub fn allows_in_tenant(&self, perm: Permission, tenant: &str) -> bool {
        self.policy.allows_in_tenant(&self.caller, perm, tenant)
    }

    /// Whether the caller holds `perm` with some scope.
    pub fn allows_somewhere(&self, perm: Permission) -> bool {
        self.policy.allows_somewhere(&self.caller, perm)
    }

    /// A filter for work off the request's task (e.g. an audit query on a blocking thread):
    /// whether the caller holds `perm` on a key.
    pub fn filter(&self, perm: Permission) -> impl Fn(&KeyName) -> bool + Send + 'static {
        let (policy, caller) = (self.policy.clone(), self.caller.clone());
        move |key| policy.allows(&caller, perm, key)
    }

    /// Grants `perm` on `key`, or says why not: the role × scope decision, then for a provider
    /// identity the kill switch and the key's accepted justifications (for every permission).
    pub fn grant(&mut self, perm: Permission, key: &KeyName) -> Result<Grant, BrokerError> {
        if let Some(p) = &self.policy.platform
            && p.reserves(key)
            && PLATFORM_ONLY.contains(&perm)
            && !p.is_platform(&self.caller)
        {
            return Err(Denied::PlatformManaged {
                caller: self.caller.id.clone(),
                permission: perm,
                key: key.clone(),
            }
            .into());
        }
        if !self.allows(perm, key) {
            return Err(Denied::Key {
                caller: self.caller.id.clone(),
                permission: perm,
                key: key.clone(),
            }
            .into());
        }
        if self.provider {
            if !self.hyok.connected() {
                return Err(Denied::HyokDisconnected.into());
            }
            self.policy.check_justification(key, self.reason)?;
        }
        Ok(Grant {
            key: key.clone(),
            permission: perm,
        })
    }

    /// The creation of a tenant's platform-managed key on the platform's first use of it:
    /// `used` is the grant the request already holds to wrap or encrypt with the key. `None`
    /// unless the policy runs the platform model, the key is a tenant's default key and the
    /// caller is the platform. The key is created only if it does not exist yet.
    pub fn platform_key(&self, used: &Grant) -> Option<PlatformKey> {
        let p = self.policy.platform.as_ref()?;
        let use_perm = matches!(used.permission, Permission::Wrap | Permission::Encrypt);
        (use_perm && p.reserves(&used.key) && p.is_platform(&self.caller)).then(|| PlatformKey {
            grant: Grant {
                key: used.key.clone(),
                permission: Permission::Create,
            },
            algorithm: p.algorithm,
            rotation_period_ms: p.rotation_period_ms,
        })
    }

    /// Checks a broker-wide permission (scope `all`); a provider identity also passes the
    /// kill switch.
    pub fn global(&self, perm: Permission) -> Result<(), BrokerError> {
        if self.policy.allows_global(&self.caller, perm) {
            self.admit()
        } else {
            Err(Denied::Permission {
                caller: self.caller.id.clone(),
                permission: perm,
            }
            .into())
        }
    }

    /// Whether the caller is a provider identity, gated by the kill switch: the switch is
    /// checked again before its reply, so nothing reaches it once `Disconnect` has returned.
    pub fn gated(&self) -> bool {
        self.provider
    }

    /// The kill switch, read now.
    pub fn hyok_connected(&self) -> bool {
        self.hyok.connected()
    }
}

/// The policy in force, swapped atomically on reload.
pub struct PolicyHandle {
    current: RwLock<Arc<Policy>>,
    path: Option<PathBuf>,
    last_text: RwLock<String>,
}

impl PolicyHandle {
    /// A fixed policy (no file).
    pub fn fixed(p: Policy) -> Self {
        Self {
            current: RwLock::new(Arc::new(p)),
            path: None,
            last_text: RwLock::new(String::new()),
        }
    }

    /// Loads the policy file; fails if it is invalid.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        let p = Policy::parse(&text).map_err(|e| format!("policy file {}: {e}", path.display()))?;
        Ok(Self {
            current: RwLock::new(Arc::new(p)),
            path: Some(path.to_path_buf()),
            last_text: RwLock::new(text),
        })
    }

    /// The policy in force.
    pub fn get(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file. An invalid file is rejected (logged) and the previous policy stays.
    /// Returns whether a new policy took effect.
    pub fn reload(&self, force: bool) -> bool {
        let Some(path) = &self.path else { return false };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "policy reload failed; the previous policy stays in force");
                return false;
            }
        };
        if !force && *self.last_text.read().unwrap_or_else(|e| e.into_inner()) == text {
            return false;
        }
        *self.last_text.write().unwrap_or_else(|e| e.into_inner()) = text.clone();
        match Policy::parse(&text) {
            Ok(p) => {
                let n = p.bindings.len();
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
                tracing::info!(path = %path.display(), bindings = n, "policy reloaded");
                true
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "invalid policy file rejected; the previous policy stays in force");
                false
            }
        }
    }

    /// Reloads on SIGHUP and whenever the file's content changes (checked every second).
    pub fn watch(self: &Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; policy reloads on change only");
                    None
                }
            };
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let force = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                        tracing::info!("SIGHUP: reloading the policy");
                        true
                    }
                };
                let me2 = me.clone();
                let _ = tokio::task::spawn_blocking(move || me2.reload(force)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;

    fn caller(id: &str) -> Caller {
        Caller {
            id: id.into(),
            kind: IdentityKind::Spiffe,
        }
    }
    fn key(s: &str) -> KeyName {
        KeyName::parse(s).expect("name")
    }

    #[test]
    fn globs() {
        assert!(glob("spiffe://x/*", "spiffe://x/a/b"));
        assert!(glob("acme/pay-*", "acme/pay-1"));
        assert!(!glob("acme/pay-*", "acme/bill-1"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*", ""));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exact2"));
    }

    #[test]
    fn identity_patterns_match_kind_and_segments() {
        let c = |id: &str, kind| Caller {
            id: id.into(),
            kind,
        };
        let p = |t: &str| IdentityPattern::parse(t).expect(t);
        let admin = p("spiffe://acme.example/admin");
        assert!(admin.matches(&c("spiffe://acme.example/admin", IdentityKind::Spiffe)));
        // The same string from a DNS SAN is another kind of identity.
        assert!(!admin.matches(&c("spiffe://acme.example/admin", IdentityKind::Dns)));
        // `*` stays within its segment; `**` takes whole segments.
        let one = p("spiffe://acme.example/payments/*");
        assert!(one.matches(&c("spiffe://acme.example/payments/a", IdentityKind::Spiffe)));
        assert!(!one.matches(&c(
            "spiffe://acme.example/payments/a/b",
            IdentityKind::Spiffe
        )));
        assert!(!one.matches(&c("spiffe://acme.example/payments", IdentityKind::Spiffe)));
        let all = p("spiffe://acme.example/**");
        assert!(all.matches(&c("spiffe://acme.example/a/b/c", IdentityKind::Spiffe)));
        assert!(!all.matches(&c("spiffe://acme.example.evil/a", IdentityKind::Spiffe)));
        assert!(!all.matches(&c("spiffe://acme.example", IdentityKind::Spiffe)));
        let dns = p("*.acme.example");
        assert!(dns.matches(&c("app.acme.example", IdentityKind::Dns)));
        assert!(!dns.matches(&c("a.b.acme.example", IdentityKind::Dns)));
        assert!(!dns.matches(&c("app.acme.example", IdentityKind::Spiffe)));
        assert_eq!(p("dns:APP.Acme.example"), p("app.acme.example"));
        assert!(p("unix:*").matches(&c("unix:uid=0", IdentityKind::Unix)));
        assert!(!p("unix:*").matches(&c("unix:uid=0", IdentityKind::SigV4)));
        for (bad, why) in [
            ("spiffe://acme.example*", "trust domain out"),
            ("spiffe://*/admin", "trust domain out"),
            ("spiffe://acme.example/a/**/b", "last segment"),
            ("spiffe://acme.example/../admin", "\"..\""),
            ("spiffe://acme.example/a%2f", "'%'"),
            ("spiffe://Acme/x", "'A'"),
            ("https://acme.example/x", "not a SPIFFE ID"),
            ("a..b", "label"),
            ("**", "bare"),
        ] {
            let e = IdentityPattern::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn deny_by_default_and_scopes() {
        let p = Policy::parse(
            r#"
[[binding]]
identity = "spiffe://c/app"
role = "service-encryption-user"
scope = "tenant:acme"
[[binding]]
identity = "spiffe://c/ops/*"
roles = ["crypto-user", "crypto-officer"]
scope = "key:acme/pay-*"
"#,
        )
        .expect("valid");
        let app = caller("spiffe://c/app");
        assert!(p.allows(&app, Permission::Wrap, &key("acme/x")));
        assert!(!p.allows(&app, Permission::Wrap, &key("other/x")));
        assert!(!p.allows(&app, Permission::Create, &key("acme/x")));
        let ops = caller("spiffe://c/ops/alice");
        assert!(p.allows(&ops, Permission::Purge, &key("acme/pay-1")));
        assert!(!p.allows(&ops, Permission::Purge, &key("acme/bill")));
        assert!(p.allows_in_tenant(&ops, Permission::ReadMetadata, "acme"));
        assert!(!p.allows_in_tenant(&ops, Permission::ReadMetadata, "other"));
        let nobody = caller("spiffe://c/nobody");
        assert!(!p.knows(&nobody));
        for perm in [Permission::ReadMetadata, Permission::Wrap] {
            assert!(!p.allows(&nobody, perm, &key("acme/x")));
        }
    }

    #[test]
    fn invalid_files_are_refused_with_a_reason() {
        for (text, needle) in [
            (
                "[[binding]]\nidentity = \"*\"\nrole = \"auditor\"\nscope = \"all\"",
                "bare",
            ),
            (
                "[[binding]]\nidentity = \"x\"\nrole = \"king\"\nscope = \"all\"",
                "king",
            ),
            (
                "[[binding]]\nidentity = \"x\"\nrole = \"auditor\"\nscope = \"everything\"",
                "scope",
            ),
            ("[[binding]]\nidentity = \"x\"\nscope = \"all\"", "role"),
            ("[[bindings]]\nidentity = \"x\"", "bindings"),
        ] {
            let e = Policy::parse(text).expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn on_behalf_of_limits_a_binding_to_matching_upstream_principals() {
        let p = Policy::parse(
            r#"
[[binding]]
identity = "xks:acme"
role = "service-crypto-user"
scope = "tenant:acme"
on_behalf_of = ["arn:aws:iam::111122223333:*"]
"#,
        )
        .expect("valid");
        let xks = Caller {
            id: "xks:acme".into(),
            kind: IdentityKind::SigV4,
        };
        let k = key("acme/k1");
        let up = |arn: Option<&str>| Upstream {
            principal: arn.map(str::to_string),
            operation: Some("Encrypt".into()),
            ..Upstream::default()
        };
        let alice = up(Some("arn:aws:iam::111122223333:user/Alice"));
        let mallory = up(Some("arn:aws:iam::999999999999:user/Mallory"));
        assert!(p.allows_for(&xks, Some(&alice), Permission::Encrypt, &k));
        assert!(!p.allows_for(&xks, Some(&mallory), Permission::Encrypt, &k));
        assert!(!p.allows_for(&xks, Some(&up(None)), Permission::Encrypt, &k));
        assert!(!p.allows_for(&xks, None, Permission::Encrypt, &k));
        assert!(
            !p.allows_for(&xks, Some(&alice), Permission::Wrap, &k),
            "role"
        );
        // The identity is still known (an XKS health check reports no principal).
        assert!(p.knows(&xks));
        let e = Policy::parse(
            "[[binding]]\nidentity = \"x\"\nrole = \"auditor\"\nscope = \"all\"\non_behalf_of = [\"*\"]",
        )
        .expect_err("a bare * is refused");
        assert!(e.contains("on_behalf_of"), "{e}");
    }

    #[test]
    fn the_example_policies_parse() {
        for text in [
            include_str!("../../examples/managed-hsm-policy.toml"),
            include_str!("../../examples/hyok-policy.toml"),
        ] {
            Policy::parse(text).expect("example policy");
        }
    }

    #[test]
    fn a_platform_key_allows_what_any_first_use_may_be() {
        use crate::model::{Algorithm, KeyOp};
        let pk = |algorithm| PlatformKey {
            grant: Grant {
                key: KeyName::new("acme", "default").expect("name"),
                permission: Permission::Create,
            },
            algorithm,
            rotation_period_ms: PLATFORM_ROTATION_MS,
        };
        let gcm = pk(Algorithm::Aes256Gcm).operations();
        assert!(KeyOp::DEFAULT.iter().all(|o| gcm.contains(o)));
        assert!(gcm.contains(&KeyOp::Encrypt) && gcm.contains(&KeyOp::Decrypt));
        assert_eq!(gcm.len(), 6);
        let kwp = pk(Algorithm::AesKeyWrapPad).operations();
        assert_eq!(kwp, KeyOp::DEFAULT.into_iter().collect());
    }

    #[test]
    fn a_platform_section_is_checked_and_the_example_reserves_default() {
        let p = Policy::parse(include_str!("../../examples/managed-hsm-policy.toml"))
            .expect("example policy");
        let rules = p.platform.expect("[platform]");
        assert_eq!(rules.rotation_period_ms, PLATFORM_ROTATION_MS);
        assert!(rules.reserves(&KeyName::new("acme", "default").expect("name")));
        assert!(!rules.reserves(&KeyName::new("acme", "cmk").expect("name")));
        let base = "[platform]\nidentities = [\"spiffe://p.example/storage\"]\n";
        assert!(Policy::parse(base).is_ok());
        for (extra, says) in [
            ("algorithm = \"rsa-oaep-sha256\"", "AES-256"),
            ("algorithm = \"nope\"", "AES-256"),
            ("rotation_period_ms = 10", "at least 1000"),
            ("default_key = \"bad name\"", "default_key"),
            ("shadow = true", "unknown field"),
        ] {
            let e = Policy::parse(&format!("{base}{extra}")).expect_err(extra);
            assert!(e.contains(says), "{extra}: {e}");
        }
        for ids in ["[]", "[\"*\"]"] {
            let e = Policy::parse(&format!("[platform]\nidentities = {ids}")).expect_err(ids);
            assert!(e.contains("identities"), "{ids}: {e}");
        }
    }

    #[test]
    fn payload_permissions_follow_the_published_table() {
        use Permission::*;
        assert!(Role::CryptoUser.permissions().contains(&Encrypt));
        assert!(Role::CryptoUser.permissions().contains(&Decrypt));
        assert!(!Role::ServiceEncryptionUser.permissions().contains(&Encrypt));
        assert!(!Role::ServiceEncryptionUser.permissions().contains(&Decrypt));
        assert_eq!(
            Role::ServiceCryptoUser.permissions(),
            &[ReadMetadata, Encrypt, Decrypt]
        );
    }

    #[test]
    fn justifications() {
        let p = Policy::parse(
            r#"
[[binding]]
identity = "spiffe://customer/admin"
role = "administrator"
scope = "all"
[[binding]]
identity = "spiffe://partner/app"
role = "service-encryption-user"
scope = "all"
[hyok]
service_identities = ["spiffe://provider/*"]
default_accepted_reasons = ["CUSTOMER_INITIATED_ACCESS"]
[[hyok.key]]
keys = "acme/logs-*"
accepted_reasons = ["PROVIDER_INTERNAL_MAINTENANCE"]
"#,
        )
        .expect("valid");
        assert!(p.is_provider(&caller("spiffe://provider/kms")));
        // The administrators are the customer's (no customer_identities given)...
        assert!(!p.is_provider(&caller("spiffe://customer/admin")));
        // ...and everyone else is the provider's, listed or not (fail closed).
        assert!(p.is_provider(&caller("spiffe://partner/app")));
        assert!(p.is_provider(&caller("spiffe://nobody/at-all")));
        // Named customers: exactly those.
        let named = Policy::parse("[hyok]\ncustomer_identities = [\"spiffe://customer/*\"]\n")
            .expect("valid");
        assert!(!named.is_provider(&caller("spiffe://customer/ops")));
        assert!(named.is_provider(&caller("spiffe://provider/kms")));
        assert!(
            Policy::parse("[hyok]\ncustomer_identities = []\n")
                .expect_err("nobody could reconnect")
                .contains("customer_identities")
        );
        let k = key("acme/db");
        assert!(p.check_justification(&k, None).is_err());
        assert!(
            p.check_justification(&k, Some(Reason::CustomerInitiatedAccess))
                .is_ok()
        );
        let e = p
            .check_justification(&k, Some(Reason::ThirdPartyDataRequest))
            .expect_err("refused");
        assert!(e.to_string().contains("THIRD_PARTY_DATA_REQUEST"), "{e}");
        let logs = key("acme/logs-1");
        assert!(
            p.check_justification(&logs, Some(Reason::ProviderInternalMaintenance))
                .is_ok()
        );
        assert!(
            p.check_justification(&logs, Some(Reason::CustomerInitiatedAccess))
                .is_err()
        );
    }
}
