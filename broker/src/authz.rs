//! Who may call: for now an allow-list of identities (exact, or a prefix ending in `*`).
//! Deny by default.

use crate::identity::Caller;

/// The allow-list from `[access] allow`.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    exact: std::collections::HashSet<String>,
    prefixes: Vec<String>,
}

impl AllowList {
    /// Builds the list. Entries ending in `*` match any identity starting with the rest.
    pub fn new<I: IntoIterator<Item = String>>(entries: I) -> Self {
        let mut list = Self::default();
        for e in entries {
            match e.strip_suffix('*') {
                Some(prefix) if !prefix.is_empty() => list.prefixes.push(prefix.to_string()),
                Some(_) => {}
                None => {
                    list.exact.insert(e);
                }
            }
        }
        list
    }

    /// Whether the caller may call.
    pub fn permits(&self, caller: &Caller) -> bool {
        self.exact.contains(&caller.id)
            || self
                .prefixes
                .iter()
                .any(|p| caller.id.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;

    fn c(id: &str) -> Caller {
        Caller {
            id: id.into(),
            kind: IdentityKind::Spiffe,
        }
    }

    #[test]
    fn exact_and_prefix_entries() {
        let a = AllowList::new([
            "spiffe://x/app".to_string(),
            "spiffe://x/team/*".to_string(),
            "*".to_string(),
        ]);
        assert!(a.permits(&c("spiffe://x/app")));
        assert!(!a.permits(&c("spiffe://x/app2")));
        assert!(a.permits(&c("spiffe://x/team/a")));
        assert!(!a.permits(&c("spiffe://x/other")));
    }
}
