//! An SQS batch of jobs through `lambda::deliver`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| courier_fuzz::sqs_event(data));
