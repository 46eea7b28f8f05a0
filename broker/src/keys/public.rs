//! A version's public half (RSA or EC) in the two standard forms callers use: SPKI PEM
//! (OpenSSL, most libraries) and a JWK (RFC 7517; what JOSE libraries and cloud key managers
//! read).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::PublicKeyInfo;
use crate::{
    error::BrokerError,
    model::{Algorithm, Curve},
};

/// rsaEncryption (RFC 8017 appendix C).
const RSA_ENCRYPTION: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// id-ecPublicKey (RFC 5480 §2.1.1).
const EC_PUBLIC_KEY: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");

/// Encodes an EC public key (RFC 5480: id-ecPublicKey with the named curve, the uncompressed
/// point as the key) and its JWK (RFC 7518 §6.2: crv, x, y).
fn ec_formats(
    pk: &PublicKeyInfo,
    curve: Curve,
    point: &[u8],
) -> Result<(String, String), BrokerError> {
    use spki::der::{Encode, asn1::BitStringRef, pem::LineEnding};
    let bad = |what: &str, err: &dyn std::fmt::Display| {
        BrokerError::internal(format!("encode public key ({what}): {err}"))
    };
    let n = curve.size();
    if point.len() != 2 * n + 1 || point[0] != 0x04 {
        return Err(BrokerError::internal(
            "an EC point that is not uncompressed",
        ));
    }
    let curve_oid = spki::ObjectIdentifier::new(curve.oid()).map_err(|e| bad("curve OID", &e))?;
    let curve_der = curve_oid.to_der().map_err(|e| bad("curve OID", &e))?;
    let params = spki::der::asn1::AnyRef::try_from(curve_der.as_slice())
        .map_err(|e| bad("curve parameters", &e))?;
    let spki = spki::SubjectPublicKeyInfoRef {
        algorithm: spki::AlgorithmIdentifierRef {
            oid: EC_PUBLIC_KEY,
            parameters: Some(params),
        },
        subject_public_key: BitStringRef::from_bytes(point).map_err(|x| bad("bit string", &x))?,
    };
    let der = spki.to_der().map_err(|x| bad("SPKI", &x))?;
    let pem = spki::der::pem::encode_string("PUBLIC KEY", LineEnding::LF, &der)
        .map_err(|x| bad("PEM", &x))?;
    let jwk = serde_json::json!({
        "kty": "EC",
        "crv": curve.jwk_name(),
        "x": URL_SAFE_NO_PAD.encode(&point[1..=n]),
        "y": URL_SAFE_NO_PAD.encode(&point[n + 1..]),
        "alg": match curve { Curve::P256 => "ES256", Curve::P384 => "ES384" },
        "use": "sig",
        "kid": pk.version_id.hex(),
    });
    Ok((pem, jwk.to_string()))
}

/// Encodes a public key (RSA or EC) as SPKI PEM and as a JWK.
pub fn public_key_formats(pk: &PublicKeyInfo) -> Result<(String, String), BrokerError> {
    use spki::der::{Encode, asn1::BitStringRef, pem::LineEnding};
    if let Some((curve, point)) = &pk.ec_point {
        return ec_formats(pk, *curve, point);
    }
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
    let jwk = if pk.algorithm == Algorithm::RsaSign {
        // One RSA signing key signs RS* and PS*: no single "alg".
        serde_json::json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(&n),
            "e": URL_SAFE_NO_PAD.encode(&e),
            "use": "sig",
            "kid": pk.version_id.hex(),
        })
    } else {
        serde_json::json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(&n),
            "e": URL_SAFE_NO_PAD.encode(&e),
            "alg": if pk.algorithm == Algorithm::RsaOaepSha1 { "RSA-OAEP" } else { "RSA-OAEP-256" },
            "use": "enc",
            "kid": pk.version_id.hex(),
        })
    };
    Ok((pem, jwk.to_string()))
}
