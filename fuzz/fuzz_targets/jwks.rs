//! A JWKS document through `Verifier::from_jwks`, then its keys in use.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::jwks(data));
