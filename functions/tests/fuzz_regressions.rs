//! Every input the fuzzers keep, replayed without cargo-fuzz: the crashes
//! in `fuzz/artifacts/<target>/` (until they are fixed and moved),
//! `fuzz/regressions/<target>/` (fixed, kept so they stay fixed) and the
//! seeds in `fuzz/corpus/<target>/`, each through the very function its
//! target calls (`fuzz/src/harness.rs`, compiled in here as a module), over
//! the courier-aws crate's Lambda edge.

#[path = "../../fuzz/src/harness.rs"]
mod harness;

use courier_aws::lambda;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for kind in ["artifacts", "regressions", "corpus"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else { continue };
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

#[test]
fn every_kept_fuzz_input_runs_without_a_panic() {
    let mut failed = Vec::new();
    let mut replayed = 0;
    for &(target, run) in harness::TARGETS {
        let seeds = inputs(target);
        assert!(!seeds.is_empty(), "fuzz/corpus/{target}/ has no seeds");
        for path in seeds {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            replayed += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failed.push(format!("{target}: {}", path.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "these fuzz inputs panic (replay one with `cargo fuzz run <target> <file>`):\n{}",
        failed.join("\n")
    );
    println!("{replayed} fuzz inputs replayed");
}
