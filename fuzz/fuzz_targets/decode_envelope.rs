//! The envelope decoder reads bytes from the network: it must never panic, and whatever
//! it accepts must survive a round trip through the encoder unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelopes) = kausal_bus::decode(data) {
        let bytes = kausal_bus::encode(&envelopes);
        let again = kausal_bus::decode(&bytes).expect("re-encoded envelopes decode");
        assert_eq!(again, envelopes, "decode(encode(x)) != x");
    }
});
