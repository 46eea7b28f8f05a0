//! The envelope decoder sees attacker bytes first: it must never panic, and whatever it accepts
//! must be exactly header || ciphertext of the input with the documented layout.
#![no_main]
use keybroker::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = envelope::parse(data) {
        assert_eq!(e.header.len() + e.ciphertext.len(), data.len());
        assert_eq!(&data[..e.header.len()], e.header);
        assert_eq!(e.header[0], envelope::FORMAT_V1);
        assert_eq!(e.header[1], e.algorithm.id());
        assert_eq!(&e.header[2..18], e.version.as_bytes());
        assert_eq!(usize::from(e.header[18]), e.nonce.len());
        let again = envelope::seal(envelope::header(e.algorithm, e.version, e.nonce), e.ciphertext);
        assert_eq!(again, data);
    }
    // A double-key envelope: exactly its header, L, and two halves that parse on their own.
    if let Ok(d) = envelope::parse_double(data) {
        assert!(envelope::parse(data).is_err());
        assert_eq!(d.header, &data[..19]);
        assert_eq!(&d.header[2..18], d.version.as_bytes());
        assert!(envelope::parse(d.local).is_ok() && envelope::parse(d.external).is_ok());
        let body = envelope::double_body(d.local, d.external);
        assert_eq!(envelope::seal(envelope::double_header(d.version), &body), data);
    }
});
