//! Attaching one KEK version made by another broker process (a replica sharing the token):
//! found by its `CKA_ID` with a fresh search (a token shows another process's new objects to a
//! new search), checked exactly as at start-up, then cached.

use super::{ExpectedKek, Hsm, HsmError, MAINTAIN, canary_verdict, check_template, find_one};

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
            let problems = check_template(s, &h, e.algorithm, mech, e.origin)?;
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
