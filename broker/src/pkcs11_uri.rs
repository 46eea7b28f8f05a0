//! PKCS #11 URIs (RFC 7512) for selecting the module and token, the way HSM tooling does
//! (`p11tool`, OpenSSL's pkcs11 provider, p11-kit): `[hsm] uri = "pkcs11:token=prod;slot-id=0?
//! module-path=/usr/lib/vendor/libpkcs11.so&pin-source=file:/etc/keybroker/pin"`.
//!
//! Parsing follows the RFC's grammar (§2.3): `pkcs11:` then path attributes separated by `;`,
//! then optionally `?` and query attributes separated by `&`. Values are percent-decoded (`%3B`
//! is a `;` inside a value, `%25` a `%`); a character the grammar does not allow in that
//! component must be percent-encoded, and a broken escape is refused. An attribute may appear at
//! most once in the path (§2.3); the query attributes the RFC defines at most once too.
//!
//! What keybroker does with each attribute:
//! * token selection (path): `token`, `manufacturer`, `serial`, `model` (`CK_TOKEN_INFO`),
//!   `slot-id`, `slot-description`, `slot-manufacturer` (`CK_SLOT_INFO`), `library-manufacturer`,
//!   `library-description`, `library-version` (`CK_INFO`). Every one given must match; values are
//!   compared with the blank padding of the fixed-size PKCS #11 fields removed. A
//!   `library-version` of `3` means 3.0.
//! * object attributes (`object`, `type`, `id`): refused — the broker selects a token and finds
//!   its own objects by `CKA_ID`.
//! * unknown path attributes (vendor-specific ones included) are refused: an attribute the broker
//!   cannot check would silently widen the match to a token it was meant to exclude.
//! * query: `module-path` (the module), `pin-source` (`file:` + path, a bare absolute path, or
//!   keybroker's `env:NAME`); `pin-value` is refused — a PIN is never written inline;
//!   `module-name` is refused (name the file with `module-path`); unknown query attributes
//!   (vendor-specific) are ignored, as the RFC lets a consumer do, and reported so a typo shows.

use std::path::PathBuf;

/// A parsed PKCS #11 URI (only what token selection uses; see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token`: the token label.
    pub token: Option<String>,
    /// `manufacturer`: the token's manufacturer id.
    pub manufacturer: Option<String>,
    /// `serial`: the token's serial number.
    pub serial: Option<String>,
    /// `model`: the token's model.
    pub model: Option<String>,
    /// `slot-id`.
    pub slot_id: Option<u64>,
    /// `slot-description`.
    pub slot_description: Option<String>,
    /// `slot-manufacturer`.
    pub slot_manufacturer: Option<String>,
    /// `library-manufacturer`.
    pub library_manufacturer: Option<String>,
    /// `library-description`.
    pub library_description: Option<String>,
    /// `library-version` as (major, minor).
    pub library_version: Option<(u8, u8)>,
    /// `module-path`.
    pub module_path: Option<PathBuf>,
    /// `pin-source`.
    pub pin_source: Option<PinSource>,
    /// Query attributes keybroker does not know and ignored (names).
    pub ignored: Vec<String>,
    /// Object attributes present (`object`, `type`, `id`): parsed, but a token URI refuses them.
    pub object_attributes: Vec<String>,
}

/// Where the PIN comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN.
    File(PathBuf),
    /// An environment variable holding the PIN (keybroker's `env:NAME`).
    Env(String),
}

/// Why a URI was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("PKCS #11 URI: {0}")]
pub struct UriError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(m.into()))
}

/// RFC 3986 unreserved characters.
fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// `pk11-pchar`: unreserved, `pk11-res-avail` (`:[]@!$'()*+,=`) and `&`.
fn path_char(c: u8) -> bool {
    unreserved(c)
        || matches!(
            c,
            b':' | b'['
                | b']'
                | b'@'
                | b'!'
                | b'$'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b'&'
        )
}

/// `pk11-qchar`: unreserved, `pk11-res-avail` and `/ ? |`.
fn query_char(c: u8) -> bool {
    unreserved(c)
        || matches!(
            c,
            b':' | b'['
                | b']'
                | b'@'
                | b'!'
                | b'$'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b'/'
                | b'?'
                | b'|'
        )
}

/// Percent-decodes `s`, refusing characters `allowed` rejects and malformed escapes.
fn decode(s: &str, allowed: fn(u8) -> bool, what: &str) -> Result<Vec<u8>, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) if hex.is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit())) => {
                        out.push(v);
                        i += 3;
                    }
                    _ => {
                        return err(format!(
                            "{what}: \"%\" must start an escape of two hex digits"
                        ));
                    }
                }
            }
            c if allowed(c) => {
                out.push(c);
                i += 1;
            }
            c => {
                return err(format!(
                    "{what}: the character {:?} must be percent-encoded",
                    char::from(c)
                ));
            }
        }
    }
    Ok(out)
}

fn text(bytes: Vec<u8>, what: &str) -> Result<String, UriError> {
    String::from_utf8(bytes).or_else(|_| err(format!("{what} is not UTF-8")))
}

impl Pkcs11Uri {
    /// Parses a URI (surrounding whitespace ignored).
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let uri = uri.trim();
        let Some(rest) = uri
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case("pkcs11:"))
            .map(|_| &uri[7..])
        else {
            return err("must start with \"pkcs11:\"");
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut u = Pkcs11Uri::default();
        let mut seen = std::collections::BTreeSet::new();
        if !path.is_empty() {
            for attr in path.split(';') {
                let Some((name, value)) = attr.split_once('=') else {
                    return err(format!("path attribute {attr:?} has no \"=\""));
                };
                if name.is_empty() {
                    return err("a path attribute has an empty name");
                }
                if !name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                {
                    return err(format!("attribute name {name:?} is malformed"));
                }
                if !seen.insert(name.to_string()) {
                    return err(format!(
                        "attribute {name:?} appears more than once in the path (RFC 7512 §2.3)"
                    ));
                }
                let raw = decode(value, path_char, name)?;
                match name {
                    "token" => u.token = Some(text(raw, name)?),
                    "manufacturer" => u.manufacturer = Some(text(raw, name)?),
                    "serial" => u.serial = Some(text(raw, name)?),
                    "model" => u.model = Some(text(raw, name)?),
                    "slot-description" => u.slot_description = Some(text(raw, name)?),
                    "slot-manufacturer" => u.slot_manufacturer = Some(text(raw, name)?),
                    "library-manufacturer" => u.library_manufacturer = Some(text(raw, name)?),
                    "library-description" => u.library_description = Some(text(raw, name)?),
                    "slot-id" => {
                        let t = text(raw, name)?;
                        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
                            return err(format!("slot-id {t:?} is not a decimal number"));
                        }
                        u.slot_id = Some(
                            t.parse()
                                .or_else(|_| err(format!("slot-id {t:?} is too large")))?,
                        );
                    }
                    "library-version" => {
                        let t = text(raw, name)?;
                        let (maj, min) = t.split_once('.').unwrap_or((&t, "0"));
                        let num = |s: &str| -> Result<u8, UriError> {
                            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                                return err(format!("library-version {t:?} is not N or N.M"));
                            }
                            s.parse()
                                .or_else(|_| err(format!("library-version {t:?} is out of range")))
                        };
                        u.library_version = Some((num(maj)?, num(min)?));
                    }
                    "object" | "id" => {
                        u.object_attributes.push(name.to_string());
                    }
                    "type" => {
                        let t = text(raw, name)?;
                        if !["public", "private", "cert", "secret-key", "data"]
                            .contains(&t.as_str())
                        {
                            return err(format!("type {t:?} is not one RFC 7512 defines"));
                        }
                        u.object_attributes.push(name.to_string());
                    }
                    other => {
                        return err(format!(
                            "path attribute {other:?} is not one keybroker can check; it would widen the token match, so it is refused"
                        ));
                    }
                }
            }
        }
        if let Some(q) = query {
            let mut qseen = std::collections::BTreeSet::new();
            for attr in q.split('&') {
                let Some((name, value)) = attr.split_once('=') else {
                    return err(format!("query attribute {attr:?} has no \"=\""));
                };
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                {
                    return err(format!("attribute name {name:?} is malformed"));
                }
                let raw = decode(value, query_char, name)?;
                let standard = ["pin-source", "pin-value", "module-name", "module-path"];
                if standard.contains(&name) && !qseen.insert(name.to_string()) {
                    return err(format!("query attribute {name:?} appears more than once"));
                }
                match name {
                    "pin-value" => {
                        return err(
                            "pin-value is refused: a PIN is never written inline; use pin-source=file:/path or [hsm] pin_env",
                        );
                    }
                    "module-name" => {
                        return err(
                            "module-name is not supported: name the module file with module-path=/path/to/module.so",
                        );
                    }
                    "module-path" => {
                        let p = PathBuf::from(text(raw, name)?);
                        if !p.is_absolute() {
                            return err("module-path must be an absolute path");
                        }
                        u.module_path = Some(p);
                    }
                    "pin-source" => {
                        let t = text(raw, name)?;
                        u.pin_source = Some(if let Some(v) = t.strip_prefix("env:") {
                            if v.is_empty() {
                                return err("pin-source=env: needs a variable name");
                            }
                            PinSource::Env(v.to_string())
                        } else {
                            let p = t
                                .strip_prefix("file://")
                                .or_else(|| t.strip_prefix("file:"))
                                .unwrap_or(&t);
                            if !p.starts_with('/') {
                                return err(format!(
                                    "pin-source {t:?}: use file:/absolute/path (or env:NAME)"
                                ));
                            }
                            PinSource::File(PathBuf::from(p))
                        });
                    }
                    other => u.ignored.push(other.to_string()),
                }
            }
        }
        Ok(u)
    }

    /// Whether the URI selects any token attribute at all.
    pub fn selects_token(&self) -> bool {
        self.token.is_some()
            || self.manufacturer.is_some()
            || self.serial.is_some()
            || self.model.is_some()
            || self.slot_id.is_some()
            || self.slot_description.is_some()
            || self.slot_manufacturer.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example of RFC 7512 §3.3, in order, and what keybroker makes of it.
    #[test]
    fn the_rfc_7512_examples() {
        let ok = |s: &str| Pkcs11Uri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let refused = |s: &str| Pkcs11Uri::parse(s).expect_err(s).0;

        assert_eq!(ok("pkcs11:"), Pkcs11Uri::default());

        let u = ok("pkcs11:object=my-pubkey;type=public");
        assert_eq!(u.object_attributes, vec!["object", "type"]);

        let u = ok("pkcs11:object=my-key;type=private?pin-source=file:/etc/token");
        assert_eq!(u.pin_source, Some(PinSource::File("/etc/token".into())));

        let u = ok(
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin",
        );
        assert_eq!(u.token.as_deref(), Some("The Software PKCS#11 Softtoken"));
        assert_eq!(u.manufacturer.as_deref(), Some("Snake Oil, Inc."));
        assert_eq!(u.model.as_deref(), Some("1.0"));
        assert_eq!(u.serial.as_deref(), Some(""));
        assert_eq!(u.object_attributes, vec!["object", "type", "id"]);
        assert_eq!(u.pin_source, Some(PinSource::File("/etc/token_pin".into())));

        assert_eq!(
            refused("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11"),
            "module-name is not supported: name the module file with module-path=/path/to/module.so"
        );

        let u = ok("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1");
        assert_eq!(u.module_path, Some("/mnt/libmypkcs11.so.1".into()));

        assert_eq!(
            refused(
                "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin"
            ),
            "pin-value is refused: a PIN is never written inline; use pin-source=file:/path or [hsm] pin_env"
        );

        let u = ok("pkcs11:slot-description=Sun%20Metaslot");
        assert_eq!(u.slot_description.as_deref(), Some("Sun Metaslot"));

        let u = ok(
            "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;library-version=1.23",
        );
        assert_eq!(u.library_manufacturer.as_deref(), Some("Snake Oil, Inc."));
        assert_eq!(u.library_description.as_deref(), Some("Soft Token Library"));
        assert_eq!(u.library_version, Some((1, 23)));

        let u = ok(
            "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
        );
        assert_eq!(u.token.as_deref(), Some("My token% created by Joe"));
        assert_eq!(u.library_version, Some((3, 0)));
        assert_eq!(u.object_attributes, vec!["id"]);

        let u = ok(
            "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        );
        assert_eq!(u.token.as_deref(), Some("A name with a substring %;"));

        let u = ok(
            "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
        );
        assert_eq!(
            u.token.as_deref(),
            Some("Name with a small A with acute: \u{e1}")
        );

        // A vendor-specific path attribute cannot be checked: refused. (Without it, the
        // vendor-specific query attribute is ignored and reported.)
        assert_eq!(
            refused(
                "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a?pin-source=file:/etc/token_pin&vendor-bbb=value-b"
            ),
            "path attribute \"vendor-aaa\" is not one keybroker can check; it would widen the token match, so it is refused"
        );
        let u = ok("pkcs11:token=my-token?pin-source=file:/etc/token_pin&vendor-bbb=value-b");
        assert_eq!(u.ignored, vec!["vendor-bbb"]);
    }

    #[test]
    fn the_issue_example_and_keybroker_pin_sources() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=prod;serial=42a1;slot-id=0?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kb/pin",
        )
        .expect("valid");
        assert_eq!(
            (u.token.as_deref(), u.serial.as_deref(), u.slot_id),
            (Some("prod"), Some("42a1"), Some(0))
        );
        assert_eq!(
            u.module_path,
            Some("/usr/lib/softhsm/libsofthsm2.so".into())
        );
        assert_eq!(u.pin_source, Some(PinSource::File("/etc/kb/pin".into())));
        assert!(u.selects_token());
        for (src, want) in [
            ("env:KB_PIN", PinSource::Env("KB_PIN".into())),
            ("file:///etc/kb/pin", PinSource::File("/etc/kb/pin".into())),
            ("/etc/kb/pin", PinSource::File("/etc/kb/pin".into())),
        ] {
            let u = Pkcs11Uri::parse(&format!("pkcs11:token=a?pin-source={src}")).expect(src);
            assert_eq!(u.pin_source, Some(want));
        }
        // The scheme is case-insensitive (RFC 3986 §3.1).
        assert!(Pkcs11Uri::parse("PKCS11:token=a").is_ok());
    }

    #[test]
    fn malformed_uris_are_refused_with_the_reason() {
        for (uri, why) in [
            ("pkcs11-token=a", "must start with \"pkcs11:\""),
            ("pkcs11:token", "path attribute \"token\" has no \"=\""),
            (
                "pkcs11:token=a;token=b",
                "attribute \"token\" appears more than once in the path (RFC 7512 §2.3)",
            ),
            (
                "pkcs11:token=a%2",
                "token: \"%\" must start an escape of two hex digits",
            ),
            (
                "pkcs11:token=a%zz",
                "token: \"%\" must start an escape of two hex digits",
            ),
            (
                "pkcs11:token=a b",
                "token: the character ' ' must be percent-encoded",
            ),
            (
                "pkcs11:token=a/b",
                "token: the character '/' must be percent-encoded",
            ),
            ("pkcs11:token=%ff", "token is not UTF-8"),
            ("pkcs11:slot-id=x", "slot-id \"x\" is not a decimal number"),
            (
                "pkcs11:slot-id=99999999999999999999999",
                "slot-id \"99999999999999999999999\" is too large",
            ),
            (
                "pkcs11:type=key",
                "type \"key\" is not one RFC 7512 defines",
            ),
            (
                "pkcs11:library-version=1.x",
                "library-version \"1.x\" is not N or N.M",
            ),
            (
                "pkcs11:token=a?module-path=lib.so",
                "module-path must be an absolute path",
            ),
            (
                "pkcs11:token=a?pin-source=file:/a&pin-source=file:/b",
                "query attribute \"pin-source\" appears more than once",
            ),
            (
                "pkcs11:token=a?pin-source=https://x/pin",
                "pin-source \"https://x/pin\": use file:/absolute/path (or env:NAME)",
            ),
            (
                "pkcs11:token=a?pin-source=file:/a&pin-value=1234",
                "pin-value is refused: a PIN is never written inline; use pin-source=file:/path or [hsm] pin_env",
            ),
        ] {
            assert_eq!(Pkcs11Uri::parse(uri).expect_err(uri).0, why, "{uri}");
        }
    }
}
