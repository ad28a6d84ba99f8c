#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sd_fuzz::cluster_token(data));
