//! SMTP pre-login dialogue fed in fuzzer-chosen chunks; see `postern_fuzz::preauth`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::protocol::Protocol;

fuzz_target!(|data: &[u8]| postern_fuzz::preauth(Protocol::Smtp, data));
