//! An API Gateway WebSocket event (or authorizer request) through the Lambda edge.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::lambda_event(data));
