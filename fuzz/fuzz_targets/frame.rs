//! A client frame: the one-pass parse, the refusals, then dispatch.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::frame(data));
