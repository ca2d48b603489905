//! A token string through the HS256 and JWKS verifiers.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::token(data));
