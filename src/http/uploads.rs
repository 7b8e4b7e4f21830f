//! The one kind of request whose body may be larger than `max_body_bytes`: a file upload, a
//! `POST` to one path. Its body is read whole into memory like any other, and held until the
//! answer is written, so uploads have a size cap of their own and a cap on how many are held
//! at once: past it, one more is refused from its head with 503 before any of it is read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Where uploads go, how large one may be, and how many may be held at once.
#[derive(Debug, Clone)]
pub(crate) struct Uploads {
    path: String,
    max_bytes: u64,
    at_once: usize,
    held: Arc<AtomicUsize>,
}

impl Uploads {
    pub(crate) fn new(path: &str, max_bytes: u64, at_once: usize) -> Uploads {
        Uploads {
            path: path.to_string(),
            max_bytes,
            at_once,
            held: Arc::default(),
        }
    }

    /// Whether a request with this method and path is an upload.
    pub(crate) fn is_upload(&self, method: &str, path: &str) -> bool {
        method == "POST" && path == self.path
    }

    pub(crate) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub(crate) fn at_once(&self) -> usize {
        self.at_once
    }

    /// One of the slots, or `None` when all are held.
    pub(crate) fn take(&self) -> Option<UploadSlot> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.at_once).then_some(held + 1)
            })
            .ok()
            .map(|_| UploadSlot(Arc::clone(&self.held)))
    }

    /// Uploads held now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// An upload's place among those held at once; given back when dropped with its request.
#[derive(Debug)]
pub(crate) struct UploadSlot(Arc<AtomicUsize>);

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_posts_to_the_path_are_uploads_and_slots_come_back_when_dropped() {
        let uploads = Uploads::new("/v1/files", 100, 2);
        assert!(uploads.is_upload("POST", "/v1/files"));
        assert!(!uploads.is_upload("GET", "/v1/files"));
        assert!(!uploads.is_upload("POST", "/v1/files/x"));
        let a = uploads.take().unwrap();
        let b = uploads.take().unwrap();
        assert!(uploads.take().is_none(), "both slots held");
        assert_eq!(uploads.held(), 2);
        drop(a);
        let c = uploads.take().unwrap();
        drop((b, c));
        assert_eq!(uploads.held(), 0);
        // Clones share the slots: the config is cloned into the server's state.
        let clone = uploads.clone();
        let _held = clone.take().unwrap();
        assert_eq!(uploads.held(), 1);
    }
}
