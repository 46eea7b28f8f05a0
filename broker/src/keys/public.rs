//! An RSA version's public half in the two standard forms callers use: SPKI PEM (OpenSSL,
//! most libraries) and a JWK (RFC 7517; what JOSE libraries and cloud key managers read).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::PublicKeyInfo;
use crate::{error::BrokerError, model::Algorithm};

/// rsaEncryption (RFC 8017 appendix C).
const RSA_ENCRYPTION: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Encodes an RSA public key as SPKI PEM and as a JWK.
pub fn public_key_formats(pk: &PublicKeyInfo) -> Result<(String, String), BrokerError> {
    use spki::der::{Encode, asn1::BitStringRef, pem::LineEnding};
    let strip = |b: &[u8]| -> Vec<u8> {
        let i = b
            .iter()
            .position(|&x| x != 0)
            .unwrap_or(b.len().saturating_sub(1));
        b[i..].to_vec()
    };
    let (n, e) = (strip(&pk.modulus), strip(&pk.exponent));
    let bad = |what: &str, err: &dyn std::fmt::Display| {
        BrokerError::internal(format!("encode public key ({what}): {err}"))
    };
    let rsa = pkcs1::RsaPublicKey {
        modulus: pkcs1::UintRef::new(&n).map_err(|x| bad("modulus", &x))?,
        public_exponent: pkcs1::UintRef::new(&e).map_err(|x| bad("exponent", &x))?,
    };
    let rsa_der = rsa.to_der().map_err(|x| bad("PKCS#1", &x))?;
    let spki = spki::SubjectPublicKeyInfoRef {
        algorithm: spki::AlgorithmIdentifierRef {
            oid: RSA_ENCRYPTION,
            parameters: Some(spki::der::asn1::AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&rsa_der)
            .map_err(|x| bad("bit string", &x))?,
    };
    let der = spki.to_der().map_err(|x| bad("SPKI", &x))?;
    let pem = spki::der::pem::encode_string("PUBLIC KEY", LineEnding::LF, &der)
        .map_err(|x| bad("PEM", &x))?;
    let jwk = serde_json::json!({
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(&n),
        "e": URL_SAFE_NO_PAD.encode(&e),
        "alg": if pk.algorithm == Algorithm::RsaOaepSha1 { "RSA-OAEP" } else { "RSA-OAEP-256" },
        "use": "enc",
        "kid": pk.version_id.hex(),
    });
    Ok((pem, jwk.to_string()))
}
