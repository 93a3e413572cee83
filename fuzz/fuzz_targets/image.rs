#![no_main]
//! Fuzz target `image`: see `ferry_fuzz_props::image`.

#[global_allocator]
static ALLOC: ferry_fuzz_props::alloc::CountingAlloc = ferry_fuzz_props::alloc::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz_props::image(data));
