//! The envelope decoder reads bytes from the network: it must never panic, and whatever
//! it accepts (in any format) must survive a round trip through the encoder of every
//! format unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelopes) = kausal_bus::decode(data) {
        for major in 1..=kausal_bus::envelope::FORMAT_MAJOR {
            let bytes = kausal_bus::encode_as(major, &envelopes);
            let again = kausal_bus::decode(&bytes).expect("re-encoded envelopes decode");
            assert_eq!(again, envelopes, "decode(encode_as({major}, x)) != x");
        }
    }
});
