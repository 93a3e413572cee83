//! Replays the fuzz seeds (`fuzz/seeds/TARGET/`: valid messages, images and
//! batches) and corpus (`fuzz/corpus/TARGET/`, kept small by `scripts/fuzz`)
//! through the same property functions the
//! libFuzzer targets call, on stable: every input that ever mattered to a
//! fuzzer, crashes found and fixed included, is checked by `cargo test`.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use ferry_fuzz_props::alloc::{self, CountingAlloc};
use ferry_fuzz_props::TARGETS;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs every corpus file of `target` through its property; fails naming
/// every file whose property failed.
fn replay(target: &str) {
    assert!(
        alloc::installed(),
        "the counting allocator is not installed"
    );
    let (_, prop) = TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .unwrap_or_else(|| panic!("no property for target {target}"));
    let mut files = Vec::new();
    for kind in ["seeds", "corpus"] {
        let dir = fuzz_dir().join(kind).join(target);
        let mut here: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        assert!(!here.is_empty(), "{} is empty", dir.display());
        here.sort();
        files.extend(here);
    }
    let mut failed = Vec::new();
    for f in &files {
        let bytes = fs::read(f).expect("read corpus file");
        if catch_unwind(AssertUnwindSafe(|| prop(&bytes))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus inputs fail: {failed:?}",
        failed.len(),
        files.len()
    );
}

macro_rules! corpus_tests {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { replay(stringify!($name)); })*

        /// Every target in TARGETS and in fuzz/fuzz_targets has a replay
        /// test here.
        #[test]
        fn every_target_is_replayed() {
            let mut here = vec![$(stringify!($name)),*];
            here.sort_unstable();
            let mut props: Vec<_> = TARGETS.iter().map(|t| t.0).collect();
            props.sort_unstable();
            assert_eq!(here, props, "TARGETS and the replay tests differ");
            let mut bins: Vec<String> = fs::read_dir(fuzz_dir().join("fuzz_targets"))
                .expect("fuzz/fuzz_targets")
                .map(|e| e.expect("entry").file_name().to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            bins.sort_unstable();
            assert_eq!(bins, props, "fuzz/fuzz_targets and TARGETS differ");
        }
    };
}

corpus_tests!(frame, control, stream, batch, image, page_store, trust);
