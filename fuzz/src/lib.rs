//! Fuzz targets for the pure parsers of crate `dmr` (the v1 message, the envelope, JOSE, the
//! legacy JWT, the CentOps directory, RSA keys and timestamps). See `README.md` beside this crate.
//!
//! [`targets`] holds one function per target; the libFuzzer binaries in `fuzz_targets/` are thin
//! calls into it, and the root crate's `tests/fuzz_corpus.rs` includes the same files to replay
//! the committed corpus in the normal test suite.

pub mod fixtures;
pub mod targets;
