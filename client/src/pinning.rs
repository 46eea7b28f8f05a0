//! Which broker keys [`Client::open`](crate::Client::open) accepts a message from.
//!
//! A sealed message is authentic under its DEK, and the DEK is only as trustworthy as the key
//! that wrapped it: anyone who may use *some* key the reader may unwrap with can seal a message
//! of their choosing, and without a check on the key the reader would open it like its own (see
//! the crate docs, "Envelope encryption authenticates the key, not the sender"). So an open
//! names the keys it accepts ([`OpenKeys::Only`], the default: the client's sealing key), and
//! accepting any key the broker allows ([`OpenKeys::Discovery`]) must be asked for.

use std::collections::BTreeSet;

use crate::error::{Error, Result};

/// The tenant of a key name without a `/` (as at the broker).
const DEFAULT_TENANT: &str = "default";

/// Which broker keys an open accepts: the key that unwraps a message's DEK (as the broker
/// reports it, over the mutually authenticated channel) must be one of them, or the open fails
/// with [`Error::Unauthentic`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenKeys {
    /// Strict mode: only these keys (`tenant/name`; a name without `/` is in the tenant
    /// `default`, as at the broker). With exactly one key the broker is told which key to expect
    /// and refuses an envelope of any other key itself, before it unwraps; with several, the
    /// broker unwraps under whichever key the envelope names and the client refuses the result
    /// when that key is not in the list.
    Only(Vec<String>),
    /// Discovery mode: every key the broker lets this client unwrap with. Safe only where no one
    /// who may use any of those keys could have written the sealed data (e.g. a client whose
    /// identity may unwrap under one key only). WARNING: with an identity that may unwrap under
    /// several keys, anyone who may seal under one of them can substitute their own messages.
    Discovery,
}

impl OpenKeys {
    /// Strict mode with these keys.
    pub fn only<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        OpenKeys::Only(names.into_iter().map(Into::into).collect())
    }
}

/// [`OpenKeys`] checked and in the broker's spelling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Full key names (`tenant/name`), at least one.
    Keys(BTreeSet<String>),
    /// Any key.
    Any,
}

impl Accepted {
    /// Checks `keys`: strict mode needs at least one key, each a `tenant/name` or a `name`.
    pub(crate) fn new(keys: &OpenKeys) -> Result<Self> {
        match keys {
            OpenKeys::Discovery => Ok(Accepted::Any),
            OpenKeys::Only(names) if names.is_empty() => Err(Error::Config(
                "OpenKeys::Only needs at least one key (OpenKeys::Discovery accepts any key)"
                    .into(),
            )),
            OpenKeys::Only(names) => names
                .iter()
                .map(|n| full_name(n))
                .collect::<Result<_>>()
                .map(Accepted::Keys),
        }
    }

    /// Whether a message whose DEK `key` unwrapped may be opened.
    pub(crate) fn allows(&self, key: &str) -> bool {
        match self {
            Accepted::Any => true,
            Accepted::Keys(keys) => keys.contains(key),
        }
    }

    /// The key to name in `UnwrapKeyRequest.key` (the broker then refuses an envelope of any
    /// other key as unauthentic): the one accepted key, or none.
    pub(crate) fn broker_key(&self) -> Option<&str> {
        match self {
            Accepted::Keys(keys) if keys.len() == 1 => keys.first().map(String::as_str),
            _ => None,
        }
    }
}

/// `tenant/name`, or `default/name` for a bare `name`, checked against the broker's syntax (each
/// part 1-64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit; `keybroker.proto`), so
/// that the request the client sends with it is well-formed and a typo is a configuration
/// error rather than a message refused as unauthentic.
fn full_name(name: &str) -> Result<String> {
    let part = |p: &str| {
        (1..=64).contains(&p.len())
            && p.as_bytes()[0].is_ascii_alphanumeric()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    match name.split_once('/') {
        None if part(name) => Ok(format!("{DEFAULT_TENANT}/{name}")),
        Some((tenant, key)) if part(tenant) && part(key) => Ok(name.to_string()),
        _ => Err(Error::Config(format!(
            "{name:?} is not a key name (tenant/name or name; letters, digits, '.', '_', '-')"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_mode_accepts_exactly_the_named_keys_in_the_brokers_spelling() {
        let one = Accepted::new(&OpenKeys::only(["acme/payments"])).expect("valid");
        assert!(one.allows("acme/payments"));
        for other in [
            "acme/payments2",
            "acme/Payments",
            "evil/payments",
            "",
            "acme",
        ] {
            assert!(!one.allows(other), "{other:?}");
        }
        assert_eq!(one.broker_key(), Some("acme/payments"));

        let bare = Accepted::new(&OpenKeys::only(["demo"])).expect("valid");
        assert!(bare.allows("default/demo") && !bare.allows("demo"));
        assert_eq!(bare.broker_key(), Some("default/demo"));

        // Several keys: checked by the client only (the broker's field holds one key).
        let two = Accepted::new(&OpenKeys::only(["acme/a", "acme/b", "acme/a"])).expect("valid");
        assert!(two.allows("acme/a") && two.allows("acme/b") && !two.allows("acme/c"));
        assert_eq!(two.broker_key(), None);
    }

    #[test]
    fn discovery_accepts_any_key_and_names_none() {
        let any = Accepted::new(&OpenKeys::Discovery).expect("valid");
        assert!(any.allows("evil/inbox") && any.allows("acme/payments"));
        assert_eq!(any.broker_key(), None);
    }

    #[test]
    fn an_empty_list_or_a_malformed_name_is_a_configuration_error() {
        for keys in [
            OpenKeys::Only(vec![]),
            OpenKeys::only([""]),
            OpenKeys::only(["acme/"]),
            OpenKeys::only(["/payments"]),
            OpenKeys::only(["acme/payments/x"]),
            OpenKeys::only(["acme/payments", "/"]),
            OpenKeys::only(["acme/payments "]),
            OpenKeys::only(["acme/.payments"]),
            OpenKeys::only(["acme/pay ments"]),
            OpenKeys::only([format!("acme/{}", "k".repeat(65))]),
        ] {
            assert!(
                matches!(Accepted::new(&keys), Err(Error::Config(_))),
                "{keys:?}"
            );
        }
    }
}
