//! `keybroker audit verify` reads files an attacker may have written: it must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (v, macs, cps) = keybroker::audit::verify_chain(data);
    assert!(macs.len() as u64 <= v.checkpoints);
    assert_eq!(cps.len(), macs.len() + v.problems.iter().filter(|p| p.contains("without a valid MAC")).count());
});
