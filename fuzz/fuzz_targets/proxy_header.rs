//! The PROXY protocol header parser; see `postern_fuzz::proxy_header`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| postern_fuzz::proxy_header(data));
