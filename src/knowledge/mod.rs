//! The knowledge base's own work, below the API and the store (issue 16): turning an uploaded
//! file into text, the text into chunks, chunks and queries into vectors; scanning a store's
//! vectors for the nearest; filtering by file attributes. Plain functions on plain data: nothing
//! here knows the server, the API or the store.

pub(crate) mod cache;
pub(crate) mod chunk;
pub(crate) mod cite;
pub(crate) mod extract;
pub(crate) mod filters;
pub(crate) mod vector;
pub(crate) mod words;
