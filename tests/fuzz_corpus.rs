//! The fuzz targets (`fuzz/`) inside the normal test suite: every committed corpus input is
//! replayed through its target, then each target gets a bounded number of mutated inputs from a
//! fixed seed, so a failure reproduces with the same numbers. Coverage-guided runs are
//! `scripts/fuzz.sh`'s; this is the cheap, deterministic part CI always runs.
//!
//! `DMR_FUZZ_SEED` and `DMR_FUZZ_MUTATIONS` (per target) change the random part, e.g. for a longer
//! local run.

#[path = "../fuzz/src/fixtures.rs"]
mod fixtures;
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

const DEFAULT_SEED: u64 = 0x0d3b_0738_4d9a_04c3;
const DEFAULT_MUTATIONS: usize = 10_000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, data)
        })
        .collect()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// Runs `input` through `target`; on a panic, saves the input where the message says and fails.
fn run(target: &(&str, fn(&[u8])), input: &[u8], origin: &str) {
    let (name, body) = *target;
    if catch_unwind(AssertUnwindSafe(|| body(input))).is_err() {
        let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-failure-{name}"));
        std::fs::write(&saved, input).expect("save the failing input");
        panic!(
            "fuzz target {name} failed on {origin}; input saved to {} (add it to fuzz/corpus/{name}/ once fixed)",
            saved.display()
        );
    }
}

#[test]
fn every_target_has_a_corpus_and_a_libfuzzer_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, _) in targets::ALL {
        assert!(!corpus(name).is_empty(), "fuzz/corpus/{name}/ is empty");
        let bin = root.join("fuzz_targets").join(format!("{name}.rs"));
        assert!(bin.exists(), "{} is missing", bin.display());
    }
    for entry in std::fs::read_dir(root.join("corpus")).expect("fuzz/corpus") {
        let name = entry.expect("corpus dir").file_name();
        let name = name.to_string_lossy();
        assert!(
            targets::ALL.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name}/ belongs to no target"
        );
    }
}

#[test]
fn every_corpus_input_passes_its_target() {
    for target in targets::ALL {
        for (path, data) in corpus(target.0) {
            run(target, &data, &path.display().to_string());
        }
    }
}

#[test]
fn mutated_corpus_inputs_pass_their_targets() {
    let seed = env_number("DMR_FUZZ_SEED", DEFAULT_SEED);
    let mutations = usize::try_from(env_number("DMR_FUZZ_MUTATIONS", DEFAULT_MUTATIONS as u64)).unwrap_or(usize::MAX);
    for target in targets::ALL {
        let seeds: Vec<Vec<u8>> = corpus(target.0).into_iter().map(|(_, d)| d).collect();
        let mut rng = SplitMix64(seed ^ fnv1a(target.0.as_bytes()));
        for i in 0..mutations {
            let input = mutate(&seeds, &mut rng);
            run(target, &input, &format!("mutation {i} (DMR_FUZZ_SEED={seed})"));
        }
    }
}

/// A small deterministic PRNG (SplitMix64): the same seed gives the same inputs on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Bytes the parsers give meaning to: JSON and JOSE punctuation, numbers at the edges of what
/// they hold, and the vectors' agent ids.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b".",
    b"-",
    b"\\n",
    b"\\u0000",
    b"null",
    b"true",
    b"0",
    b"-1",
    b"1e308",
    b"-1e300",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"18446744073709551616",
    b"0.5",
    b"\"\"",
    b"Z",
    b"z",
    b"T",
    b"+14:00",
    b"-23:59",
    b"9999",
    b"0000",
    b"60",
    b"==",
    b"AAAA",
    b"=",
    b"d3b07384-d9a0-4c3f-a4e2-123456789abc",
    b"A1E45678-12BC-4EF0-9876-DEF123456789",
    b"\xff",
    b"\xc3\xa9",
    b"\x80\x01",
    b"\xff\xff\xff\xff\x0f",
    b"-----BEGIN PUBLIC KEY-----\n",
    b"-----END CERTIFICATE-----",
];

/// One to four mutations of a corpus input: byte edits, token insertion and replacement, chunk
/// duplication and deletion, splicing with another input, truncation.
fn mutate(seeds: &[Vec<u8>], rng: &mut SplitMix64) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(8) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 | 3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            4 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let end = (at + rng.below(8)).min(data.len());
                data.splice(at..end, token.iter().copied());
            }
            5 => {
                let end = (at + 1 + rng.below(32)).min(data.len());
                data.drain(at..end);
            }
            6 => {
                let end = (at + 1 + rng.below(64)).min(data.len());
                let chunk = data[at..end].to_vec();
                data.splice(at..at, chunk);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}
