#![no_main]

// The parse is held to its memory bound: the target counts the heap.
#[global_allocator]
static ALLOCATOR: lazysnap_fuzz::alloc_count::Counting = lazysnap_fuzz::alloc_count::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lazysnap_fuzz::targets::toc(data);
});
