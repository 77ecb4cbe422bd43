//! Shared by the store's test files.

use dmr_store::{Store, StoreOptions};
use std::path::Path;
use std::time::Duration;

/// Opens a store in `dir` with a quick TTL sweep.
pub fn open(dir: &Path) -> Store {
    Store::open(
        dir,
        StoreOptions {
            sweep_interval: Duration::from_millis(50),
        },
    )
    .unwrap()
}
