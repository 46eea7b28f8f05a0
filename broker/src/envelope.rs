//! The wrapped-DEK envelope, format 1: self-describing, so unwrap needs nothing from the caller
//! but the envelope (and its AAD), and it keeps working after rotation.
//!
//! ```text
//! offset  size  field
//! 0       1     format            0x01
//! 1       1     algorithm         1 AES-256-GCM, 2 AES-KWP (RFC 5649), 3 RSA-OAEP-SHA256, 4 RSA-OAEP-SHA1,
//!                                 7 AES-KW (RFC 3394); 5 and 6 are signing algorithms, never here
//!                                 (8: a double-key envelope, see [`DOUBLE`])
//! 2       16    key version id    the version's id = its HSM object's CKA_ID
//! 18      1     nonce length N    12 for AES-256-GCM, 0 otherwise
//! 19      N     nonce             the AES-GCM IV
//! 19+N    rest  ciphertext        GCM: encrypted DEK || 16-byte tag; KWP: RFC 5649 output;
//!                                 KW: RFC 3394 output;
//!                                 OAEP: one modulus-sized block
//! ```
//!
//! For AES-256-GCM the AAD given to the HSM is `header || caller_aad`, where header is bytes
//! `0 .. 19+N`: the algorithm, version and IV are authenticated with the DEK.
//!
//! Parsing is strict: any length that does not fit the algorithm is refused, and every refusal
//! is the same [`BrokerError::Unauthentic`] (no oracle on which check failed).
//!
//! **Format 2, the encrypted payload** (`Encrypt`/`Decrypt`), is a sibling with the same layout
//! and its own format byte `0x02`: algorithm 1 (AES-256-GCM: ciphertext = encrypted payload ||
//! tag, 1 to 64 KiB of payload) or 3/4 (RSA-OAEP: one modulus-sized block); AES-KWP (2) and
//! AES-KW (7) never appear. Its AAD is likewise its header || the caller's AAD. Because the header is the start
//! of the AAD the HSM authenticates, the first byte keeps the two kinds apart under one key: a
//! wrapped DEK handed to `Decrypt` (or a payload handed to `UnwrapKey`) fails authentication,
//! so a caller allowed to decrypt payloads cannot read the DEKs a key wraps, nor the reverse.
//! Its refusals are all [`BrokerError::UnauthenticCiphertext`].

use crate::{
    error::BrokerError,
    model::{Algorithm, MAX_DEK_LEN, MAX_PAYLOAD_LEN, MIN_DEK_LEN, VersionId},
};

/// The format byte of this envelope layout.
pub const FORMAT_V1: u8 = 0x01;
/// The format byte of an encrypted payload (format 2, see the module docs).
pub const FORMAT_PAYLOAD: u8 = 0x02;
/// The AES-GCM IV length (NIST SP 800-38D's recommended 96 bits). Never anything else.
pub const GCM_IV_LEN: usize = 12;
/// The AES-GCM tag length (128 bits). Never anything shorter.
pub const GCM_TAG_LEN: usize = 16;
/// Header length before the nonce.
const FIXED_HEADER: usize = 19;

/// A parsed envelope, borrowing the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The algorithm that wrapped the DEK.
    pub algorithm: Algorithm,
    /// The key version that wrapped it.
    pub version: VersionId,
    /// The nonce (AES-GCM IV) or empty.
    pub nonce: &'a [u8],
    /// The ciphertext.
    pub ciphertext: &'a [u8],
    /// The header bytes (authenticated as AAD prefix for AES-GCM).
    pub header: &'a [u8],
}

/// Builds the header for a new envelope.
pub fn header(algorithm: Algorithm, version: VersionId, nonce: &[u8]) -> Vec<u8> {
    header_of(FORMAT_V1, algorithm, version, nonce)
}

/// Builds the header for a new encrypted payload (format 2).
pub fn payload_header(algorithm: Algorithm, version: VersionId, nonce: &[u8]) -> Vec<u8> {
    header_of(FORMAT_PAYLOAD, algorithm, version, nonce)
}

fn header_of(format: u8, algorithm: Algorithm, version: VersionId, nonce: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(FIXED_HEADER + nonce.len());
    h.push(format);
    h.push(algorithm.id());
    h.extend_from_slice(version.as_bytes());
    // Nonces are 0 or 12 bytes: the cast cannot truncate.
    h.push(nonce.len() as u8);
    h.extend_from_slice(nonce);
    h
}

/// Appends the ciphertext to a header made by [`header`].
pub fn seal(mut header: Vec<u8>, ciphertext: &[u8]) -> Vec<u8> {
    header.extend_from_slice(ciphertext);
    header
}

/// The AAD the HSM sees for AES-GCM: the header, then the caller's AAD.
pub fn gcm_aad(header: &[u8], caller_aad: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + caller_aad.len());
    a.extend_from_slice(header);
    a.extend_from_slice(caller_aad);
    a
}

/// Parses an envelope. `rsa_block` gives the modulus size in bytes for a version id, if the
/// version is an RSA key (used to check the ciphertext length before the HSM sees it).
pub fn parse(bytes: &[u8]) -> Result<Envelope<'_>, BrokerError> {
    parse_as(FORMAT_V1, bytes).ok_or(BrokerError::Unauthentic)
}

/// Parses an encrypted payload (format 2). Every refusal is
/// [`BrokerError::UnauthenticCiphertext`].
pub fn parse_payload(bytes: &[u8]) -> Result<Envelope<'_>, BrokerError> {
    parse_as(FORMAT_PAYLOAD, bytes).ok_or(BrokerError::UnauthenticCiphertext)
}

fn parse_as(format: u8, bytes: &[u8]) -> Option<Envelope<'_>> {
    if bytes.len() < FIXED_HEADER || bytes[0] != format {
        return None;
    }
    let algorithm = Algorithm::from_id(bytes[1])?;
    let version = VersionId::from_slice(&bytes[2..18])?;
    let nonce_len = usize::from(bytes[18]);
    let expected_nonce = if algorithm == Algorithm::Aes256Gcm {
        GCM_IV_LEN
    } else {
        0
    };
    if nonce_len != expected_nonce || bytes.len() < FIXED_HEADER + nonce_len {
        return None;
    }
    let (header, ciphertext) = bytes.split_at(FIXED_HEADER + nonce_len);
    let nonce = &header[FIXED_HEADER..];
    let ct_ok = match algorithm {
        // Never an envelope's algorithm (`Algorithm::from_id` refuses them).
        Algorithm::RsaSign | Algorithm::Ecdsa => false,
        // A payload: 1 byte to 64 KiB, then the tag.
        Algorithm::Aes256Gcm if format == FORMAT_PAYLOAD => {
            (GCM_TAG_LEN + 1..=GCM_TAG_LEN + MAX_PAYLOAD_LEN).contains(&ciphertext.len())
        }
        Algorithm::AesKeyWrapPad | Algorithm::AesKeyWrap if format == FORMAT_PAYLOAD => false,
        Algorithm::Aes256Gcm => {
            let n = ciphertext.len().wrapping_sub(GCM_TAG_LEN);
            ciphertext.len() >= GCM_TAG_LEN && (MIN_DEK_LEN..=MAX_DEK_LEN).contains(&n)
        }
        // RFC 5649 output is the padded input (a multiple of 8) plus an 8-byte integrity block;
        // RFC 3394 output is the input (a multiple of 8: DEKs always are) plus the same.
        Algorithm::AesKeyWrapPad | Algorithm::AesKeyWrap => {
            ciphertext.len() % 8 == 0
                && (MIN_DEK_LEN + 8..=MAX_DEK_LEN + 8).contains(&ciphertext.len())
        }
        // 2048..4096-bit moduli.
        Algorithm::RsaOaepSha256 | Algorithm::RsaOaepSha1 => {
            (256..=512).contains(&ciphertext.len())
        }
    };
    if !ct_ok {
        return None;
    }
    Some(Envelope {
        algorithm,
        version,
        nonce,
        ciphertext,
        header,
    })
}

/// The algorithm byte of a double-key envelope (double key encryption, `docs/src/dke.md`),
/// appended after AES-KW's `7`. It is no [`Algorithm`]: the envelope is a pair of format-1
/// envelopes, one per member key, after a header naming the double key's version:
///
/// ```text
/// 0       1     format            0x01
/// 1       1     algorithm         8 (double)
/// 2       16    key version id    the double key's version
/// 18      1     nonce length      0
/// 19      2     L                 the local half's length (big-endian)
/// 21      L     local half        a format-1 AES-256-GCM envelope of share 1 under the local key
/// 21+L    rest  external half     a format-1 envelope of share 2 from the external key
/// ```
///
/// The local half's AAD is [`double_aad`]: this header, the external half's SHA-256 and the
/// caller's AAD, so neither half can be swapped for another envelope's.
pub const DOUBLE: u8 = 8;

/// A parsed double-key envelope, borrowing the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Double<'a> {
    /// The double key's version.
    pub version: VersionId,
    /// The header (bytes `0 .. 19`).
    pub header: &'a [u8],
    /// The local half (a format-1 envelope).
    pub local: &'a [u8],
    /// The external half (a format-1 envelope).
    pub external: &'a [u8],
}

/// Whether `bytes` claim to be a double-key envelope (format 1, algorithm [`DOUBLE`]).
pub fn is_double(bytes: &[u8]) -> bool {
    bytes.len() > 1 && bytes[0] == FORMAT_V1 && bytes[1] == DOUBLE
}

/// The header of a new double-key envelope for the double key's version `version`.
pub fn double_header(version: VersionId) -> Vec<u8> {
    let mut h = Vec::with_capacity(FIXED_HEADER);
    h.push(FORMAT_V1);
    h.push(DOUBLE);
    h.extend_from_slice(version.as_bytes());
    h.push(0);
    h
}

/// The body after a double header: the local half's length, the local half, the external half.
pub fn double_body(local: &[u8], external: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + local.len() + external.len());
    // A format-1 envelope is at most 19 + 12 + 512 bytes: the cast cannot truncate.
    b.extend_from_slice(&(local.len() as u16).to_be_bytes());
    b.extend_from_slice(local);
    b.extend_from_slice(external);
    b
}

/// The AAD that binds a double envelope's local half: the double header, the SHA-256 of the
/// external half, then the caller's AAD.
pub fn double_aad(header: &[u8], external: &[u8], caller_aad: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut a = Vec::with_capacity(header.len() + 32 + caller_aad.len());
    a.extend_from_slice(header);
    a.extend_from_slice(&Sha256::digest(external));
    a.extend_from_slice(caller_aad);
    a
}

/// Parses a double-key envelope; each half must parse as a format-1 envelope (never itself a
/// double one). Every refusal is [`BrokerError::Unauthentic`].
pub fn parse_double(bytes: &[u8]) -> Result<Double<'_>, BrokerError> {
    parse_double_as(bytes).ok_or(BrokerError::Unauthentic)
}

fn parse_double_as(bytes: &[u8]) -> Option<Double<'_>> {
    if !is_double(bytes) || bytes.len() < FIXED_HEADER + 2 || bytes[18] != 0 {
        return None;
    }
    let version = VersionId::from_slice(&bytes[2..18])?;
    let (header, rest) = bytes.split_at(FIXED_HEADER);
    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let rest = &rest[2..];
    if len > rest.len() {
        return None;
    }
    let (local, external) = rest.split_at(len);
    if parse_as(FORMAT_V1, local)?.algorithm != Algorithm::Aes256Gcm {
        return None;
    }
    parse_as(FORMAT_V1, external)?;
    Some(Double {
        version,
        header,
        local,
        external,
    })
}

/// The key version ids an envelope names: its own, and for a double-key envelope its halves'
/// too (empty: it does not parse).
pub fn versions(bytes: &[u8]) -> Vec<VersionId> {
    if let Ok(d) = parse_double(bytes) {
        let halves = [d.local, d.external].map(|h| parse(h).map(|e| e.version));
        return std::iter::once(d.version)
            .chain(halves.into_iter().flatten())
            .collect();
    }
    parse(bytes).map(|e| vec![e.version]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(alg: Algorithm) -> Vec<u8> {
        let nonce = if alg == Algorithm::Aes256Gcm {
            vec![7u8; 12]
        } else {
            vec![]
        };
        let ct = match alg {
            Algorithm::Aes256Gcm => vec![1u8; 32 + 16],
            Algorithm::AesKeyWrapPad | Algorithm::AesKeyWrap => vec![1u8; 40],
            _ => vec![1u8; 384],
        };
        seal(header(alg, VersionId([9; 16]), &nonce), &ct)
    }

    #[test]
    fn round_trip_every_algorithm() {
        for alg in Algorithm::ENVELOPE {
            let bytes = sample(alg);
            let e = parse(&bytes).expect("parses");
            assert_eq!(e.algorithm, alg);
            assert_eq!(e.version, VersionId([9; 16]));
            assert_eq!(e.header.len(), 19 + e.nonce.len());
            assert_eq!(e.header.len() + e.ciphertext.len(), bytes.len());
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let bytes = sample(Algorithm::Aes256Gcm);
        assert_eq!(bytes[0], 0x01);
        assert_eq!(bytes[1], 1);
        assert_eq!(&bytes[2..18], &[9u8; 16]);
        assert_eq!(bytes[18], 12);
        assert_eq!(&bytes[19..31], &[7u8; 12]);
        assert_eq!(bytes.len(), 31 + 48);
    }

    #[test]
    fn truncation_extension_and_bad_bytes_are_refused() {
        for alg in Algorithm::ENVELOPE {
            let bytes = sample(alg);
            for n in 0..bytes.len() {
                let r = parse(&bytes[..n]);
                // A shorter RSA block or KWP blob may still be well-formed; it must never panic
                // and header truncation must fail.
                if n < 19 {
                    assert!(matches!(r, Err(BrokerError::Unauthentic)));
                }
            }
            let mut longer = bytes.clone();
            longer.extend_from_slice(&[0; 600]);
            assert!(matches!(parse(&longer), Err(BrokerError::Unauthentic)));
        }
        let mut b = sample(Algorithm::Aes256Gcm);
        b[0] = 2;
        assert!(matches!(parse(&b), Err(BrokerError::Unauthentic)));
        let mut b = sample(Algorithm::Aes256Gcm);
        b[1] = 9;
        assert!(matches!(parse(&b), Err(BrokerError::Unauthentic)));
        let mut b = sample(Algorithm::Aes256Gcm);
        b[18] = 11;
        assert!(matches!(parse(&b), Err(BrokerError::Unauthentic)));
    }

    #[test]
    fn payload_layout_is_format_1_with_format_byte_2() {
        let bytes = seal(
            payload_header(Algorithm::Aes256Gcm, VersionId([9; 16]), &[7; 12]),
            &[1u8; 5 + 16],
        );
        assert_eq!(bytes[0], 0x02);
        assert_eq!(bytes[1], 1);
        assert_eq!(&bytes[2..18], &[9u8; 16]);
        assert_eq!(bytes[18], 12);
        let e = parse_payload(&bytes).expect("parses");
        assert_eq!(e.ciphertext.len(), 21);
        assert_eq!(e.header, &bytes[..31]);
    }

    #[test]
    fn payloads_and_wrapped_keys_never_parse_as_each_other() {
        let payload = seal(
            payload_header(Algorithm::Aes256Gcm, VersionId([9; 16]), &[7; 12]),
            &[1u8; 32 + 16],
        );
        assert!(matches!(parse(&payload), Err(BrokerError::Unauthentic)));
        let wrapped = sample(Algorithm::Aes256Gcm);
        assert!(matches!(
            parse_payload(&wrapped),
            Err(BrokerError::UnauthenticCiphertext)
        ));
    }

    #[test]
    fn payload_sizes_are_checked() {
        let h = || payload_header(Algorithm::Aes256Gcm, VersionId([9; 16]), &[7; 12]);
        // The tag alone (an empty payload) and one byte past 64 KiB are refused.
        for bad in [0, 16, 16 + MAX_PAYLOAD_LEN + 1] {
            assert!(parse_payload(&seal(h(), &vec![0; bad])).is_err(), "{bad}");
        }
        for good in [17, 16 + MAX_PAYLOAD_LEN] {
            assert!(parse_payload(&seal(h(), &vec![0; good])).is_ok(), "{good}");
        }
        // AES key wraps (RFC 5649, RFC 3394) never encrypt payloads.
        for alg in [Algorithm::AesKeyWrapPad, Algorithm::AesKeyWrap] {
            let kw = seal(payload_header(alg, VersionId([9; 16]), &[]), &[0; 40]);
            assert!(parse_payload(&kw).is_err(), "{alg}");
        }
        let rsa = seal(
            payload_header(Algorithm::RsaOaepSha256, VersionId([9; 16]), &[]),
            &[0; 256],
        );
        assert!(parse_payload(&rsa).is_ok());
    }

    #[test]
    fn double_envelopes_round_trip_and_refuse_bad_halves() {
        let local = sample(Algorithm::Aes256Gcm);
        let external = sample(Algorithm::AesKeyWrapPad);
        let id = VersionId([3; 16]);
        let bytes = seal(double_header(id), &double_body(&local, &external));
        assert_eq!(bytes[1], DOUBLE);
        let d = parse_double(&bytes).expect("parses");
        assert_eq!(
            (d.version, d.local, d.external),
            (id, &local[..], &external[..])
        );
        assert_eq!(
            versions(&bytes),
            vec![id, VersionId([9; 16]), VersionId([9; 16])]
        );
        // A double envelope is no plain one.
        assert!(parse(&bytes).is_err());
        // A local half that is not AES-256-GCM, a length past the end, a truncated external
        // half, a nonce length: all refused.
        let kwp = seal(double_header(id), &double_body(&external, &external));
        assert!(parse_double(&kwp).is_err());
        let mut long = bytes.clone();
        long[19] = 0xff;
        assert!(parse_double(&long).is_err());
        assert!(parse_double(&bytes[..bytes.len() - 1]).is_err());
        let mut nonce = bytes.clone();
        nonce[18] = 12;
        assert!(parse_double(&nonce).is_err());
        // The binding covers the external half.
        let h = double_header(id);
        assert_ne!(double_aad(&h, &external, b""), double_aad(&h, &local, b""));
    }
}
