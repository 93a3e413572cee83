#![no_main]
//! Fuzz target `frame`: see `ferry_fuzz_props::frame`.

#[global_allocator]
static ALLOC: ferry_fuzz_props::alloc::CountingAlloc = ferry_fuzz_props::alloc::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz_props::frame(data));
