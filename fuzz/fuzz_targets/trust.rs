#![no_main]
//! Fuzz target `trust`: see `ferry_fuzz_props::trust`.

#[global_allocator]
static ALLOC: ferry_fuzz_props::alloc::CountingAlloc = ferry_fuzz_props::alloc::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz_props::trust(data));
