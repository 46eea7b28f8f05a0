//! A RestoreKey blob is read before its MAC is checked (the framing, and the name to authorise
//! the caller) and its body after: none of it may panic, and an accepted framing must be exactly
//! header || body || MAC of the input.
#![no_main]
use keybroker::keys::backup;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = backup::claimed_name(data);
    if let Ok(p) = backup::parse(data) {
        assert_eq!(p.signed.len() + p.mac.len(), data.len());
        assert_eq!(p.mac.len(), 32);
        let mut again = backup::frame(p.domain, p.body).expect("an accepted body frames again");
        assert_eq!(again, p.signed);
        again.extend_from_slice(p.mac);
        assert_eq!(again, data);
        let _ = backup::read_body(p.body);
    }
    // The body alone, as if its MAC had checked out.
    let _ = backup::read_body(data);
});
