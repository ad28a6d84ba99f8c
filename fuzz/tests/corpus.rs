//! Replays the checked-in corpus (`fuzz/corpus/<target>/`, seeds and what fuzzing kept) through
//! every target on stable, so each input fuzzing ever found stays a regression test.

use std::path::Path;

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .expect("fuzz/corpus exists")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    dirs.sort();
    let mut targets: Vec<String> = sd_fuzz::TARGETS
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    targets.sort();
    assert_eq!(
        dirs, targets,
        "one corpus directory per target in src/lib.rs, and no other"
    );

    let mut total = 0;
    for (name, target) in sd_fuzz::TARGETS {
        let mut inputs: Vec<_> = std::fs::read_dir(root.join(name))
            .expect("the target's corpus")
            .map(|e| e.expect("a directory entry").path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name} has no corpus");
        for input in &inputs {
            let data = std::fs::read(input).expect("a corpus file");
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "{name} fails on {}", input.display());
        }
        total += inputs.len();
    }
    eprintln!(
        "{total} corpus inputs over {} targets",
        sd_fuzz::TARGETS.len()
    );
}
