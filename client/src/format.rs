//! The sealed format, byte by byte, and the chunked AES-256-GCM construction (pure, no I/O).
//!
//! # Layout
//!
//! A sealed message is a header followed by one or more chunks. All integers are big-endian.
//!
//! | Offset | Size | Field |
//! |---|---|---|
//! | 0 | 3 | magic: `6b 62 73` (`"kbs"`) |
//! | 3 | 1 | format version: `0x01` |
//! | 4 | 1 | suite: `0x01` = AES-256-GCM in the STREAM construction below |
//! | 5 | 1 | chunk size exponent `e`: every chunk but the last holds exactly 2^`e` plaintext bytes; 10 ≤ `e` ≤ 24 (1 KiB … 16 MiB); default 16 (64 KiB) |
//! | 6 | 2 | `W`: length of the wrapped DEK, 1 ≤ `W` ≤ 2048 |
//! | 8 | `W` | the wrapped DEK: a keybroker envelope (format 1, see the book's `docs/src/envelope.md`), made by `GenerateDataKey` with empty broker AAD; it names the key version that can unwrap it |
//! | 8+`W` | 7 | nonce prefix: 7 random bytes, fresh for every message |
//! | 15+`W` | … | chunks |
//!
//! Chunk `i` (0, 1, 2, …) is the AES-256-GCM encryption of its plaintext (2^`e` bytes, except the
//! last chunk, which holds 0 … 2^`e` bytes) followed by its 16-byte tag, so every chunk but the
//! last is exactly 2^`e` + 16 bytes, and the last is 16 … 2^`e` + 16 bytes. An empty plaintext is
//! sealed as one empty last chunk (just a tag). With an AES-256-GCM KEK (a 79-byte envelope) the
//! header is 94 bytes, and sealing `n` bytes adds 94 + 16 × max(1, ⌈`n` / 2^`e`⌉) bytes.
//!
//! # The construction (STREAM, Hoang–Reyhanitabar–Rogaway–Vizár 2015, as in age and Tink)
//!
//! * Key: the 32-byte DEK drawn from the HSM by `GenerateDataKey`, used for **one message only**
//!   (every seal asks for a fresh DEK), so GCM's nonce space is never shared between messages.
//! * Nonce of chunk `i` (12 bytes): nonce prefix (7) ‖ `i` as u32 (4) ‖ last flag (1: `0x01` for
//!   the last chunk, `0x00` otherwise).
//! * AAD of chunk `i` (37 bytes): `D` ‖ `i` as u32 ‖ last flag, where
//!   `D` = SHA-256(header ‖ len(aad) as u64 ‖ aad) binds the whole header (format, chunk size,
//!   wrapped DEK, nonce prefix) and the caller's AAD into every chunk.
//!
//! What that buys: a flipped bit anywhere fails a tag (in the header, through `D` in every chunk;
//! in the wrapped DEK, also at the broker); **reordered** chunks fail (the index is in the nonce
//! and the AAD); a **truncated** message fails (its new final chunk was sealed with last flag 0,
//! so it does not open as the last one; a cut inside a chunk fails its tag); an **extended**
//! message fails (the old last chunk does not open as a non-last one); chunks cannot be moved
//! between messages (different DEK, prefix and `D`); a different AAD fails every chunk. All of
//! these are one error, [`crate::Error::Unauthentic`].
//!
//! A streaming reader releases each chunk's plaintext once that chunk authenticates, before it
//! knows whether the stream ends correctly: act on streamed plaintext only after
//! [`Decryptor::finish`] (or the `finish` of the async wrappers) returns `Ok`.

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce, Tag,
    aead::{AeadInPlace, generic_array::GenericArray},
};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};

/// `"kbs"`.
pub const MAGIC: [u8; 3] = *b"kbs";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// AES-256-GCM, STREAM construction.
pub const SUITE_AES256GCM_STREAM: u8 = 1;
/// Smallest chunk size exponent (1 KiB).
pub const MIN_CHUNK_LOG2: u8 = 10;
/// Largest chunk size exponent (16 MiB): bounds what a reader buffers.
pub const MAX_CHUNK_LOG2: u8 = 24;
/// Default chunk size exponent (64 KiB).
pub const DEFAULT_CHUNK_LOG2: u8 = 16;
/// Largest wrapped DEK accepted (an RSA-4096 envelope is 531 bytes).
pub const MAX_WRAPPED_LEN: usize = 2048;
/// Nonce prefix length.
pub const NONCE_PREFIX_LEN: usize = 7;
/// GCM tag length (always 128 bits).
pub const TAG_LEN: usize = 16;
/// DEK length (AES-256).
pub const DEK_LEN: usize = 32;
/// Bytes of the header before the wrapped DEK.
const FIXED_LEN: usize = 8;

/// A plaintext DEK: erased from memory when dropped, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(Zeroizing<[u8; DEK_LEN]>);

impl DataKey {
    /// Takes the DEK out of a buffer (which is erased, whatever its length). Anything but 32
    /// bytes is refused.
    pub fn take(buf: &mut Vec<u8>) -> Option<Self> {
        let key = <[u8; DEK_LEN]>::try_from(buf.as_slice())
            .ok()
            .map(|k| Self(Zeroizing::new(k)));
        buf.zeroize();
        key
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(GenericArray::from_slice(&self.0[..]))
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey([REDACTED; 32 bytes])")
    }
}

/// A parsed or freshly made header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    bytes: Vec<u8>,
    chunk_log2: u8,
    wrapped_len: usize,
}

impl Header {
    /// A header for a new message.
    pub fn new(
        chunk_log2: u8,
        wrapped: &[u8],
        nonce_prefix: [u8; NONCE_PREFIX_LEN],
    ) -> Result<Self> {
        if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&chunk_log2) {
            return Err(Error::Config(format!(
                "chunk size exponent {chunk_log2} is outside {MIN_CHUNK_LOG2}..={MAX_CHUNK_LOG2}"
            )));
        }
        let w = u16::try_from(wrapped.len())
            .ok()
            .filter(|&w| w >= 1 && usize::from(w) <= MAX_WRAPPED_LEN)
            .ok_or_else(|| {
                Error::Config(format!(
                    "the broker returned a {}-byte wrapped DEK; at most {MAX_WRAPPED_LEN} fit the header",
                    wrapped.len()
                ))
            })?;
        let mut bytes = Vec::with_capacity(FIXED_LEN + wrapped.len() + NONCE_PREFIX_LEN);
        bytes.extend_from_slice(&MAGIC);
        bytes.push(FORMAT_VERSION);
        bytes.push(SUITE_AES256GCM_STREAM);
        bytes.push(chunk_log2);
        bytes.extend_from_slice(&w.to_be_bytes());
        bytes.extend_from_slice(wrapped);
        bytes.extend_from_slice(&nonce_prefix);
        Ok(Self {
            bytes,
            chunk_log2,
            wrapped_len: wrapped.len(),
        })
    }

    /// Parses a header at the start of `buf`. `Ok(None)`: not enough bytes yet. `Ok(Some((h,
    /// n)))`: the header is the first `n` bytes. Any malformed field is [`Error::Unauthentic`].
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>> {
        if buf.len() < FIXED_LEN {
            // Refuse a wrong magic, version, suite or chunk size as early as possible.
            let expected = [
                MAGIC[0],
                MAGIC[1],
                MAGIC[2],
                FORMAT_VERSION,
                SUITE_AES256GCM_STREAM,
            ];
            let n = buf.len().min(expected.len());
            if buf[..n] != expected[..n]
                || buf
                    .get(5)
                    .is_some_and(|e| !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(e))
            {
                return Err(Error::Unauthentic);
            }
            return Ok(None);
        }
        let (magic, version, suite, chunk_log2) = (&buf[0..3], buf[3], buf[4], buf[5]);
        let w = usize::from(u16::from_be_bytes([buf[6], buf[7]]));
        if magic != MAGIC
            || version != FORMAT_VERSION
            || suite != SUITE_AES256GCM_STREAM
            || !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&chunk_log2)
            || w == 0
            || w > MAX_WRAPPED_LEN
        {
            return Err(Error::Unauthentic);
        }
        let len = FIXED_LEN + w + NONCE_PREFIX_LEN;
        if buf.len() < len {
            return Ok(None);
        }
        Ok(Some((
            Self {
                bytes: buf[..len].to_vec(),
                chunk_log2,
                wrapped_len: w,
            },
            len,
        )))
    }

    /// The encoded header.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The wrapped DEK (a keybroker envelope).
    pub fn wrapped(&self) -> &[u8] {
        &self.bytes[FIXED_LEN..FIXED_LEN + self.wrapped_len]
    }

    /// Plaintext bytes per (non-last) chunk.
    pub fn chunk_len(&self) -> usize {
        1usize << self.chunk_log2
    }

    fn nonce_prefix(&self) -> [u8; NONCE_PREFIX_LEN] {
        let mut p = [0u8; NONCE_PREFIX_LEN];
        p.copy_from_slice(&self.bytes[FIXED_LEN + self.wrapped_len..]);
        p
    }
}

/// AES-256-GCM keyed with one message's DEK, with that message's nonce prefix and digest `D`.
struct ChunkCipher {
    cipher: Aes256Gcm,
    prefix: [u8; NONCE_PREFIX_LEN],
    digest: [u8; 32],
}

impl ChunkCipher {
    fn new(key: &DataKey, header: &Header, aad: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(header.as_bytes());
        h.update((aad.len() as u64).to_be_bytes());
        h.update(aad);
        Self {
            cipher: key.cipher(),
            prefix: header.nonce_prefix(),
            digest: h.finalize().into(),
        }
    }

    fn nonce_and_aad(&self, index: u32, last: bool) -> ([u8; 12], [u8; 37]) {
        let mut nonce = [0u8; 12];
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&self.prefix);
        nonce[7..11].copy_from_slice(&index.to_be_bytes());
        nonce[11] = u8::from(last);
        let mut aad = [0u8; 37];
        aad[..32].copy_from_slice(&self.digest);
        aad[32..36].copy_from_slice(&index.to_be_bytes());
        aad[36] = u8::from(last);
        (nonce, aad)
    }

    /// Encrypts one chunk: ciphertext ‖ tag.
    fn seal(&self, index: u32, last: bool, plaintext: &[u8]) -> Result<Vec<u8>> {
        let (nonce, aad) = self.nonce_and_aad(index, last);
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out)
            .map_err(|_| Error::TooLarge)?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Decrypts one chunk (ciphertext ‖ tag) into `out`.
    fn open(&self, index: u32, last: bool, chunk: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let Some(split) = chunk.len().checked_sub(TAG_LEN) else {
            return Err(Error::Unauthentic);
        };
        let (ct, tag) = chunk.split_at(split);
        let (nonce, aad) = self.nonce_and_aad(index, last);
        let start = out.len();
        out.extend_from_slice(ct);
        let r = self.cipher.decrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &aad,
            &mut out[start..],
            Tag::from_slice(tag),
        );
        if r.is_err() {
            out[start..].zeroize();
            out.truncate(start);
            return Err(Error::Unauthentic);
        }
        Ok(())
    }
}

/// Seals a message chunk by chunk. The concatenation of everything [`Encryptor::update`] and
/// [`Encryptor::finish`] return is the sealed message (the header comes first).
pub struct Encryptor {
    cipher: ChunkCipher,
    chunk_len: usize,
    /// Plaintext not yet sealed (at most one chunk): a full chunk is sealed only once more data
    /// arrives, because only then is it known not to be the last.
    buf: Zeroizing<Vec<u8>>,
    index: u32,
    header: Option<Vec<u8>>,
}

impl Encryptor {
    /// Starts a message under `key` with `header` (whose wrapped DEK must be `key`, wrapped).
    pub fn new(key: &DataKey, header: &Header, aad: &[u8]) -> Self {
        Self {
            cipher: ChunkCipher::new(key, header, aad),
            chunk_len: header.chunk_len(),
            buf: Zeroizing::new(Vec::with_capacity(header.chunk_len())),
            index: 0,
            header: Some(header.as_bytes().to_vec()),
        }
    }

    /// Takes more plaintext; returns the sealed bytes that are ready (possibly none).
    pub fn update(&mut self, mut data: &[u8]) -> Result<Vec<u8>> {
        let mut out = self.header.take().unwrap_or_default();
        while !data.is_empty() {
            if self.buf.len() == self.chunk_len {
                out.extend_from_slice(&self.seal_buffered(false)?);
            }
            let take = (self.chunk_len - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(out)
    }

    /// Seals the last chunk; returns the final sealed bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let mut out = self.header.take().unwrap_or_default();
        out.extend_from_slice(&self.seal_buffered(true)?);
        Ok(out)
    }

    fn seal_buffered(&mut self, last: bool) -> Result<Vec<u8>> {
        let sealed = self.cipher.seal(self.index, last, &self.buf)?;
        self.buf.zeroize();
        if !last {
            self.index = self.index.checked_add(1).ok_or(Error::TooLarge)?;
        }
        Ok(sealed)
    }
}

/// Opens the chunks of a message whose header has been parsed.
pub struct Decryptor {
    cipher: ChunkCipher,
    sealed_chunk_len: usize,
    /// Sealed bytes not yet opened (at most one sealed chunk).
    buf: Vec<u8>,
    index: u32,
}

impl Decryptor {
    /// Starts opening the chunks after `header`.
    pub fn new(key: &DataKey, header: &Header, aad: &[u8]) -> Self {
        let sealed_chunk_len = header.chunk_len() + TAG_LEN;
        Self {
            cipher: ChunkCipher::new(key, header, aad),
            sealed_chunk_len,
            buf: Vec::with_capacity(sealed_chunk_len),
            index: 0,
        }
    }

    /// Takes more sealed bytes; returns the plaintext of every chunk that is complete and
    /// authentic (not yet proof that the message is complete: see [`Decryptor::finish`]).
    pub fn update(&mut self, mut data: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while !data.is_empty() {
            if self.buf.len() == self.sealed_chunk_len {
                self.open_buffered(false, &mut out)?;
            }
            let take = (self.sealed_chunk_len - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(out)
    }

    /// Opens the last chunk. `Ok` proves the whole message was authentic and complete.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_buffered(true, &mut out)?;
        Ok(out)
    }

    fn open_buffered(&mut self, last: bool, out: &mut Vec<u8>) -> Result<()> {
        self.cipher.open(self.index, last, &self.buf, out)?;
        self.buf.clear();
        if !last {
            self.index = self.index.checked_add(1).ok_or(Error::Unauthentic)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> DataKey {
        DataKey::take(&mut vec![b; 32]).expect("32 bytes")
    }

    fn header(log2: u8) -> Header {
        Header::new(log2, b"wrapped-dek-envelope", [7; 7]).expect("header")
    }

    fn seal(k: &DataKey, h: &Header, aad: &[u8], pt: &[u8], pieces: usize) -> Vec<u8> {
        let mut e = Encryptor::new(k, h, aad);
        let mut out = Vec::new();
        let step = (pt.len() / pieces.max(1)).max(1);
        for part in pt.chunks(step) {
            out.extend(e.update(part).expect("update"));
        }
        out.extend(e.finish().expect("finish"));
        out
    }

    fn open(k: &DataKey, sealed: &[u8], aad: &[u8], piece: usize) -> Result<Vec<u8>> {
        let (h, n) = Header::parse(sealed)?.ok_or(Error::Unauthentic)?;
        let mut d = Decryptor::new(k, &h, aad);
        let mut out = Vec::new();
        for part in sealed[n..].chunks(piece.max(1)) {
            out.extend(d.update(part)?);
        }
        out.extend(d.finish()?);
        Ok(out)
    }

    #[test]
    fn header_layout_is_as_documented() {
        let h = header(16);
        let b = h.as_bytes();
        assert_eq!(&b[..8], &[0x6b, 0x62, 0x73, 1, 1, 16, 0, 20]);
        assert_eq!(&b[8..28], b"wrapped-dek-envelope");
        assert_eq!(&b[28..], &[7; 7]);
        assert_eq!(Header::parse(b).expect("parses"), Some((h.clone(), 35)));
        assert_eq!(h.wrapped(), b"wrapped-dek-envelope");
        assert_eq!(Header::parse(&b[..20]).expect("partial"), None);
    }

    #[test]
    fn round_trips_at_every_size_and_split() {
        let k = key(1);
        let h = header(10);
        for len in [0usize, 1, 1023, 1024, 1025, 2048, 5000] {
            let pt: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for pieces in [1, 3, 7] {
                let sealed = seal(&k, &h, b"ctx", &pt, pieces);
                let chunks = len.div_ceil(1024).max(1);
                assert_eq!(sealed.len(), 35 + len + 16 * chunks, "len {len}");
                for piece in [1usize, 100, 1040, 100_000] {
                    assert_eq!(open(&k, &sealed, b"ctx", piece).expect("opens"), pt);
                }
            }
        }
    }

    #[test]
    fn every_flipped_bit_truncation_extension_and_wrong_aad_is_refused() {
        let k = key(2);
        let h = header(10);
        let pt = vec![0x5a; 2500];
        let sealed = seal(&k, &h, b"ctx", &pt, 1);
        for i in 0..sealed.len() {
            for bit in [0u8, 3, 7] {
                let mut t = sealed.clone();
                t[i] ^= 1 << bit;
                assert!(
                    matches!(open(&k, &t, b"ctx", 4096), Err(Error::Unauthentic)),
                    "byte {i}"
                );
            }
        }
        for cut in 0..sealed.len() {
            assert!(
                matches!(
                    open(&k, &sealed[..cut], b"ctx", 4096),
                    Err(Error::Unauthentic)
                ),
                "cut {cut}"
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            open(&k, &longer, b"ctx", 4096),
            Err(Error::Unauthentic)
        ));
        assert!(matches!(
            open(&k, &sealed, b"ctx2", 4096),
            Err(Error::Unauthentic)
        ));
        assert!(matches!(
            open(&k, &sealed, b"", 4096),
            Err(Error::Unauthentic)
        ));
        assert!(matches!(
            open(&key(3), &sealed, b"ctx", 4096),
            Err(Error::Unauthentic)
        ));
    }

    #[test]
    fn reordered_dropped_and_duplicated_chunks_are_refused() {
        let k = key(4);
        let h = header(10);
        let pt: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let sealed = seal(&k, &h, b"", &pt, 1);
        let hl = h.as_bytes().len();
        let c = 1024 + TAG_LEN;
        let chunks: Vec<&[u8]> = sealed[hl..].chunks(c).collect();
        assert_eq!(chunks.len(), 4);
        let rebuild = |order: &[usize]| {
            let mut v = sealed[..hl].to_vec();
            for &i in order {
                v.extend_from_slice(chunks[i]);
            }
            v
        };
        assert_eq!(
            open(&k, &rebuild(&[0, 1, 2, 3]), b"", 999).expect("in order"),
            pt
        );
        for order in [
            &[1, 0, 2, 3][..],
            &[0, 2, 1, 3],
            &[0, 1, 3],
            &[0, 1, 2],
            &[0, 1, 1, 2, 3],
            &[0, 1, 2, 3, 3],
        ] {
            assert!(
                matches!(open(&k, &rebuild(order), b"", 999), Err(Error::Unauthentic)),
                "{order:?}"
            );
        }
    }

    #[test]
    fn malformed_headers_are_unauthentic_and_bad_settings_are_config_errors() {
        for bad in [
            &b"xbs"[..],
            b"kbs\x02",
            b"kbs\x01\x02",
            b"kbs\x01\x01\x09\x00\x01",
            b"kbs\x01\x01\x10\x00\x00",
            b"kbs\x01\x01\x10\x08\x01",
        ] {
            assert!(
                matches!(Header::parse(bad), Err(Error::Unauthentic)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Header::new(9, b"w", [0; 7]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Header::new(25, b"w", [0; 7]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Header::new(16, b"", [0; 7]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Header::new(16, &[0; 2049], [0; 7]),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn data_key_is_redacted_and_takes_only_32_bytes() {
        let mut buf = vec![0x41; 32];
        let k = DataKey::take(&mut buf).expect("32 bytes");
        assert!(buf.is_empty());
        assert_eq!(format!("{k:?}"), "DataKey([REDACTED; 32 bytes])");
        let mut short = vec![1; 16];
        assert!(DataKey::take(&mut short).is_none());
        assert!(short.is_empty());
    }
}
