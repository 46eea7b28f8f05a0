//! The sign mechanisms' known-answer tests (`probe`): fixed keys imported as session objects,
//! signatures made by an independent implementation (Python's `cryptography`, i.e. OpenSSL)
//! that the token must verify, the token's own signatures that it must verify back, and an
//! altered signature it must refuse. PKCS#1 v1.5 is deterministic, so the token's RS256
//! signature must also equal the reference byte for byte.
//!
//! * RSA: the probe's RSA-2048 test key (`kat_rsa`); RS256 and PS256 (MGF1-SHA-256, 32-byte
//!   salt) over the SHA-256 digest of [`MESSAGE`];
//! * ECDSA: the private keys of RFC 6979's P-256 and P-384 examples (A.2.5, A.2.6) over the
//!   SHA-256 and SHA-384 digests of [`MESSAGE`], signatures as r || s.
//!
//! The unit tests in `probe.rs` check every constant with a third implementation (the `rsa`,
//! `p256` and `p384` crates).

/// The message whose digests are signed (the unit tests hash it).
#[cfg(test)]
pub(crate) const MESSAGE: &[u8] = b"keybroker signature known-answer test";
/// SHA-256 of [`MESSAGE`].
pub(crate) const DIGEST256: &str =
    "709809f9c66a29f31f50901c47f33184d6928b02cbdf501954f5a187641db0c2";
/// SHA-384 of [`MESSAGE`].
pub(crate) const DIGEST384: &str = "\
    a699de391ac3b1556643ed591bdaabf61627ede8dc02c7215a6337be9e5fa20c\
    82ecabf1ff94e894bef44c08eaa5951b";
/// RS256 of [`DIGEST256`] with the `kat_rsa` key.
pub(crate) const RS256: &str = "\
    7b977c6cfd15fe191e4ee991bc857631479800198b741aea7bb0c44f42c273d6\
    ed835bb4bfadebd95fba0b6b157108350430b3270f5c01cb796522242d3e5bc0\
    45e07226b0f1327309d70384078f9bb0ab53de436238a080cbc6a5d5e7c18adc\
    340d02d67ecd6f980549949be37986d725a0c48628ac2f8ad664d08d7d3b07a7\
    681eefed3566d87b2de459aea1035977798b0592e420871b59c99092f895614b\
    ee362dd33191963c0cc8ca594c413a85c809c8cb14bb7a2058e4f0245c92f56f\
    4a3743e1169a3b8d6e92025fdbda25ed5fc66663e4ce8b86d8a5ab2eba7fd216\
    73102fe390aba0f8f1bd1df8eeeb3b47d7d01cf2cf346c175ce41bede9f47c47";
/// PS256 of [`DIGEST256`] with the `kat_rsa` key (MGF1-SHA-256, 32-byte salt).
pub(crate) const PS256: &str = "\
    0ab2829336f29c4d2b84d8f6c2140569a8681be8bf2bacb81680a437b3e30ecb\
    fca04201b77c7d7b9b25ed70dacf5ddffb16c82eecb76a0e520ed864c46819eb\
    5632aeeeea5b03f254426d2f66ecb45dfe84e58c3b9d3a83fd8a184b104ca1af\
    d90f9b2659bd0e7cf05db97e661cdaca43d37b66683bd561bb04f8035a4faf70\
    8040ff2c5e646deb23f78846f1dcd14c99a059242eff5ec6ab363e256edc4e88\
    ec0a4e23f7b424394c8ed4bff9ce4d8cd09b3a383cf783da360fd5a68c5e86e6\
    413a6a3243c3620e77a8f6a8c5ae5cad34e2783d02d88cb308cda6c74abdba94\
    c6e350fc4b30cf14cf074d7f61bbd1d260c494f3e32e81665bba9092ae5480e9";
/// The P-256 private scalar (RFC 6979 A.2.5).
pub(crate) const P256_D: &str = "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721";
/// Its public point, uncompressed.
pub(crate) const P256_POINT: &str = "\
    0460fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29f\
    b67903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d44622\
    99";
/// ES256 of [`DIGEST256`], r || s.
pub(crate) const P256_SIG: &str = "\
    62e7af24e6020a414c0f5ed02d9928d8cab942ad5469cc1a443e8bc3d36bff66\
    9f800af0174c02fbb35505b7675f894fe53f4373b5881cbbd32d530a3769d4ca";
/// The P-384 private scalar (RFC 6979 A.2.6).
pub(crate) const P384_D: &str = "\
    6b9d3dad2e1b8c1c05b19875b6659f4de23c3b667bf297ba9aa47740787137d8\
    96d5724e4c70a825f872c9ea60d2edf5";
/// Its public point, uncompressed.
pub(crate) const P384_POINT: &str = "\
    04ec3a4e415b4e19a4568618029f427fa5da9a8bc4ae92e02e06aae5286b300c\
    64def8f0ea9055866064a254515480bc138015d9b72d7d57244ea8ef9ac0c621\
    896708a59367f9dfb9f54ca84b3f1c9db1288b231c3ae0d4fe7344fd25332647\
    20";
/// ES384 of [`DIGEST384`], r || s.
pub(crate) const P384_SIG: &str = "\
    15f774318776a1e139b4c48d3fee4ceb7f161aa613ef2533346762be336e45ef\
    89a84bc9eb0835d5aa320beeef02c0ae7b7eb02586078999dc04760b93769b15\
    4bc31e9cfc7cd1cbae80c75cc7b38c14065ec898fd081dcaae830cb2ff05f350";
