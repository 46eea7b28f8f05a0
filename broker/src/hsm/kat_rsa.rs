//! The fixed RSA-2048 test key and RSA-OAEP ciphertexts of the probe's OAEP known-answer test.
//!
//! A test key only (it protects nothing): made once with `openssl genrsa 2048`; the ciphertexts
//! were made by OpenSSL (`openssl pkeyutl -encrypt -pkeyopt rsa_padding_mode:oaep`, SHA-256/MGF1-
//! SHA-256 and SHA-1/MGF1-SHA-1, empty label) of [`OAEP_MESSAGE`]. OAEP is randomised, so the
//! test is "the token decrypts an independent implementation's ciphertext"; the unit tests in
//! `probe.rs` check these constants with a third implementation (the `rsa` crate).

/// The plaintext of both ciphertexts.
pub(crate) const OAEP_MESSAGE: &[u8] = b"keybroker OAEP known-answer test";
/// The public exponent (65537).
pub(crate) const E: &str = "010001";
/// The modulus.
pub(crate) const N: &str = "\
    b31d42425e40f0cc2f206436e09aaf4723125070a9910177d540bcb867ede6ca\
    3c1ae9cda89b8122a5b73feb038f9665ab27b251a4f8b923b894ad4be8afcb29\
    35f4673a4f2057ff00a2285b83a8697babf20233e9637336ed04d6b87ab61f74\
    d05a906c4f4908cd4298fc652c7eda982bc7a671cd3654b4df426bb6cc8d4a78\
    c9805469a4acee00cd8256e0561fa0ad08de4e3e63b9a4402e773f55ea11790c\
    ecf9d3df9bce4e10e86d402e5d7b315eaf235130156b9fb121fca66e35ef0db0\
    1f708788b6f100ad4eb3fcbc9ecdcb9a1f03364ea376b356f1584b5a183a4c9f\
    f8cda688a0e1a5bd835c711f700225125e190d690da04ad892a3f43a656d50c7";
/// The private exponent.
pub(crate) const D: &str = "\
    1b4cf737a625d02e271ebba251061d7797cfbcfab72076db523758573936c894\
    8453212b962aac4fb62237780afbbca8f4220c557d1ce61c9ce5432c21f982db\
    5e071f2182ef034a9c739af82699ff08a3d2dd90165f9b5a40b299f1d623b7fe\
    b6454a39cab499f158adcddc094b5a913d81b9b6788372a77baccee88c1c1b16\
    0b1a8000eeeed8cab112758acaf97f1489f2a23ab29753634b11a6d9960096cc\
    011f39b763d30c059ac2f0ad72457394265eba5023c06dbcf63d8c28a1796766\
    1f0e9c4303a22d39f8b951dcb48b2bea9afbbc77b5530e5b23fd6d268744aaaa\
    2a5c51de35537570b31cabb4ccb8f91bf62011887ce012a55f24afe4bba07be1";
/// The first prime.
pub(crate) const P: &str = "\
    d77cbf9b7683efdbd6d94a0f8b5b6b7c37c50c2791ec0ccdc68b60a2a89cb9de\
    33da9982990ebfce99b3dc7a45b94b02b5506b04bad021b5686c6649bbf5235c\
    b0d5bc3fce275ba48308889a458e14e68bda6daef2e34b500215eae978b29dfc\
    fa89eb7820a14c760828ba623164fef3a510b543f43c3c4378af03964c1b5e21";
/// The second prime.
pub(crate) const Q: &str = "\
    d4c9e73af237d8c962dd8ddcaca34ab21cc6fd0e7948c140537d28f9e81be10f\
    5d8908360aecd5d9be45ab3aada5f5fc3fbb1fe97f5a01417adb3b3f4e2a2898\
    b1348d7002ed6853b1a9b4592161161915af817db78917407b3eb5565b568c03\
    7c415bcae300f057a01ae3b31b3a4d7b4e3c96337ba4516ab2763b2b293541e7";
/// d mod (p-1).
pub(crate) const DP: &str = "\
    47b204da47d35c01cbf91dd01030c99159c8e0e36584a139f1de3bb7c2dbea67\
    88df29862f409e06b2530a7f502577549e58f4526d89843da451b4b2c1abad29\
    50d8bc3a8a6fc3e8f783e65755df110b27eaf3e56a80bf750e4c968d39904c4a\
    785d5d0fe9e360da409ab470a9388e2f287367ac055de93b15b33d414b6f2ba1";
/// d mod (q-1).
pub(crate) const DQ: &str = "\
    248d927523cac828c01d0313976c6d966f2f17a576dc32a6543139eac41e95e8\
    c7ce94648437eefc7a9d092f09496b1a2bf07f28e34198d9a0bb2c5051a3185a\
    3286ae8d41537b0a75888b7c8c295b5c6fc7385d5a3be88ca11f4293551966ef\
    ea5667e8505a86eee687f7f97a81e771791d1b4838c31f614ecad49b3376fc9d";
/// q^-1 mod p.
pub(crate) const QINV: &str = "\
    d35f44d423f0e49f6fa7efc71dabf50df8689d53529cdbd55f2295adbcbe9139\
    432a45272894dc798dd6cc4d5640ecc1d7e5fed12e1d23e57ec1d20f047c4149\
    599880e1b518c2ad8480ae72307991712c61bd92b50ea26723fc1d8369514e77\
    07d822cbe699cc7f90d7831df923ea9d4ae98aafd117e7a0bf4bdc601db95675";
/// OAEP ciphertext, SHA-256 / MGF1-SHA-256.
pub(crate) const CT256: &str = "\
    117383a3ec687e1242dcae3e5c528da8fe9727c0e74045dc5d8bc4327cd2eab6\
    368a034c85bdcbdca5e8505764933f85f64e47e13b5e56057380929786fae447\
    21280f26250a37b8a867102ac99d404af6cea18f19b4a2bb129b8e6a453d7ae8\
    4a35a8ab88bcf9e25c8ff1af235caa8e605e21ef518cd8baa98d5cb4acfca087\
    64ded14d64abf45bae35d56f552cf8501a29bd456468ea189e1af6c7f9042df9\
    680ba1814819be57d6618a442ae36f53df2b7601aa9b8e10ccc35bae2d2668f3\
    ca71c59e8940b44fa0bf2f01b4e1a0faed9c53c212c92fb4a18ec383731049e8\
    014a1480e7c0b2077d4b8fc12ea925dc5a2133b9b9167b4544b25d3302f3e319";
/// OAEP ciphertext, SHA-1 / MGF1-SHA-1.
pub(crate) const CT1: &str = "\
    99942f998bb7391b661892eb2669978ff82c32c09f873a22b3c3bae87759bee1\
    fad09632c05ba4fc05f84dac5e19d8874a354861f10485626b912bcc528f0ca5\
    43477f3db0ecc6d277516b8b493f3093143a3caed3fe95b4703b0a78e238eb48\
    be116da4692363774b46afa2c9f4f0521456820a87049e0bbfbe492483838e2f\
    2cdf04f86e79591781bf42b4630766857868f33fa0ff204e663426382b982be5\
    6ee100f7996f785af400283bb5144f5084a3adb0c812412949b4e871e8a63c27\
    3e4e1491fc347df3315fe070eb16e5faec109eaa78226ca0d715d4efe9d43d52\
    30c6b7498d6e4d87284d90a5b1cdd6299e1fce737844ec5758f764020aa53e26";
