//! Attaching one KEK version made by another broker process (a replica sharing the token):
//! found by its `CKA_ID` with a fresh search (a token shows another process's new objects to a
//! new search), checked exactly as at start-up, then cached.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};

use super::{ExpectedKek, Hsm, HsmError, KekHandles, MAINTAIN, canary_verdict, check_template};

impl Hsm {
    /// Whether this process holds handles for a version.
    pub fn has_handles(&self, id: crate::model::VersionId) -> bool {
        self.inner
            .current()
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Finds, checks (template and canary) and caches one version's objects. The outer error
    /// is an HSM fault (retry later); the inner one an integrity problem (missing, duplicated,
    /// wrong template, wrong key).
    pub async fn attach_one(&self, e: ExpectedKek) -> Result<Result<(), String>, HsmError> {
        self.run("attach a KEK version", MAINTAIN, move |inner, conn, s| {
            let found = s
                .find_objects(&[
                    Attribute::Id(e.id.as_bytes().to_vec()),
                    Attribute::Token(true),
                ])
                .map_err(|err| HsmError::from_ck("C_FindObjects", err))?;
            let mut objs: Vec<(ObjectHandle, ObjectClass)> = Vec::new();
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
            let pick = |c: ObjectClass| -> Vec<ObjectHandle> {
                objs.iter().filter(|o| o.1 == c).map(|o| o.0).collect()
            };
            let (secrets, publics) = if e.key_type.is_rsa() {
                (
                    pick(ObjectClass::PRIVATE_KEY),
                    pick(ObjectClass::PUBLIC_KEY),
                )
            } else {
                (pick(ObjectClass::SECRET_KEY), Vec::new())
            };
            let want_public = usize::from(e.key_type.is_rsa());
            if secrets.is_empty() {
                return Ok(Err("its HSM object is missing".to_string()));
            }
            if secrets.len() > 1 || publics.len() > want_public || objs.len() != 1 + want_public {
                return Ok(Err(format!("{} HSM objects share its CKA_ID", objs.len())));
            }
            if publics.len() != want_public {
                return Ok(Err("its public key object is missing".to_string()));
            }
            let Some(mech) = inner.caps.mechanism_for(e.algorithm) else {
                return Ok(Err(format!(
                    "the token cannot serve its algorithm: {}",
                    inner.caps.why_not(e.algorithm)
                )));
            };
            let h = KekHandles {
                secret: secrets[0],
                public: publics.first().copied(),
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
