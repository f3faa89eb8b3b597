//! Bounded fuzzing that runs in CI: arbitrary bytes and mutated valid frames
//! through the engine, plus a replay of the cargo-fuzz seed corpus. The
//! engine must never panic and must only ever transmit well-formed frames.

mod support;

use proptest::prelude::*;
use support::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 20000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut lab = fuzz_lab();
        exercise(&mut lab, &data);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        seed in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let seeds = seed_frames();
        let (port, mut frame) = seeds[seed.index(seeds.len())].clone();
        for (at, byte) in flips {
            let i = at.index(frame.len());
            frame[i] = byte;
        }
        if truncate {
            frame.truncate(cut.index(frame.len() + 1));
        }
        let mut data = vec![port.0 as u8];
        data.extend_from_slice(&frame);
        let mut lab = fuzz_lab();
        // Twice: the second pass hits conntrack state the first one created.
        exercise(&mut lab, &data);
        exercise(&mut lab, &data);
    }
}

#[test]
fn seed_corpus_replays_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/engine");
    let mut n = 0;
    let mut lab = fuzz_lab();
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/engine exists") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        exercise(&mut lab, &data);
        n += 1;
    }
    assert!(
        n >= seed_frames().len(),
        "seed corpus has {n} files; regenerate it (see fuzz/README.md)"
    );
}

#[test]
fn seed_corpus_matches_the_seed_frames() {
    // The committed corpus is exactly what `seed_frames` builds, so a change
    // to the engine's test topology shows up here.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/engine");
    for (i, (port, frame)) in seed_frames().into_iter().enumerate() {
        let mut data = vec![port.0 as u8];
        data.extend_from_slice(&frame);
        let path = dir.join(format!("seed-{i:02}"));
        if std::env::var_os("KXP_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &data).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert_eq!(
            on_disk,
            data,
            "{} is stale: run KXP_WRITE_SEEDS=1 cargo test --test engine_fuzz",
            path.display()
        );
    }
}
