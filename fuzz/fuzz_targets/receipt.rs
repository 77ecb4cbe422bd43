#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dmr_fuzz::targets::receipt(data));
