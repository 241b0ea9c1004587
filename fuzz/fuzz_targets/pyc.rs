#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lazysnap_fuzz::targets::pyc(data);
});
