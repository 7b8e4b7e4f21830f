//! The SQLite backend's SQL, one file per table family. Only `store` calls it (and the store
//! bench, which measures SQLite itself): the rest of the code asks `store::jobs` and its
//! siblings, which pick the backend.

pub(super) mod conversations;
pub(super) mod jobs;
pub(super) mod keys;
pub(crate) mod migrate;
pub(crate) mod requests;
pub(super) mod retention;
pub(super) mod usage;
pub(crate) mod writer;
