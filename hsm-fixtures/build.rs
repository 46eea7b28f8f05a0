//! Builds the fault-injecting PKCS#11 module (`faultpkcs11/faultpkcs11.c`) with the system C
//! compiler (`$CC`, else `cc`) into `OUT_DIR`, and exposes its path to the crate as
//! `FAULTPKCS11_PATH` (see `hsm_fixtures::fault::module_path`). C because a PKCS#11 module is a
//! C ABI shared library and every keybroker Rust crate forbids `unsafe` code. No build
//! dependency: one compiler invocation, and a C compiler is already required (ring, SQLite).

use std::{env, path::PathBuf, process::Command};

fn main() {
    let src = PathBuf::from("faultpkcs11/faultpkcs11.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("libfaultpkcs11.so");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-shared",
            "-fPIC",
            "-O2",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fvisibility=hidden",
        ])
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .args(["-ldl", "-lpthread"])
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run the C compiler {cc:?} (softhsm/install.sh installs one): {e}")
        });
    assert!(status.success(), "compiling {} failed", src.display());
    println!("cargo:rustc-env=FAULTPKCS11_PATH={}", out.display());
}
