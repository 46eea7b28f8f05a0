//! Request validators: key names, sizes, attributes, policy files. None may panic on any input;
//! accepted names must round-trip.
#![no_main]
use keybroker::{
    model::{KeyAttributes, KeyName, check_dek_len, validate_part},
    policy::{Policy, Reason, glob},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(k) = KeyName::parse(&text) {
        let again = KeyName::parse(&k.to_string()).expect("a parsed name parses again");
        assert_eq!(again, k);
        assert!(validate_part("x", k.tenant()).is_ok() && validate_part("x", k.name()).is_ok());
    }
    let _ = check_dek_len(data.len());
    if let Ok(a) = serde_json::from_slice::<KeyAttributes>(data) {
        let _ = a.validate();
    }
    let _ = Policy::parse(&text);
    if data.len() >= 4 {
        let _ = Reason::from_proto(i32::from_le_bytes([data[0], data[1], data[2], data[3]]));
    }
    if let Some((p, s)) = text.split_once('\n') {
        let _ = glob(p, s);
    }
});
