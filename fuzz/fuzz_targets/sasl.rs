//! SASL PLAIN/LOGIN decoding and the server-side exchange; see `postern_fuzz::sasl`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| postern_fuzz::sasl(data));
