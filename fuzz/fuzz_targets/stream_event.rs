//! A DynamoDB Streams batch through `lambda::fanout`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::stream_event(data));
