//! Cancellable upstream reads. A stream's pump thread blocks reading the provider; when the
//! relay gives up (the client left, the provider stalled past its deadline) it must be able
//! to stop that read and close the upstream connection at once, not when a read timeout of a
//! minute fires. ureq lets a connector wrap every transport it makes: ours waits for input in
//! short slices on threads that registered a cancel flag, and fails the read once it is set.
//!
//! The wrapper uses ureq's `unversioned` transport API, which may change between ureq
//! releases; Cargo.toml pins ureq's version for that reason.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};
use ureq::Error;

/// How often a waiting read looks at its cancel flag: the most a cancel waits to take effect.
const SLICE: Duration = Duration::from_millis(100);

thread_local! {
    /// The flag of the read this thread is doing, if it may be cancelled.
    static CURRENT: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Cancels the reads of one stream. Cancelling is also what dropping it does, so every way
/// the relay ends (done, failed, client gone, panic) releases the upstream.
#[derive(Debug)]
pub(crate) struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A new flag, and what the reading thread passes to [`read_cancellably`].
    pub(crate) fn new() -> (Cancel, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (Cancel(Arc::clone(&flag)), flag)
    }
}

impl Cancel {
    /// Stops the reads: a waiting one fails within a slice, and its connection closes.
    pub(crate) fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Drop for Cancel {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Makes this thread's upstream reads cancellable by `flag` from now on.
pub(crate) fn read_cancellably(flag: Arc<AtomicBool>) {
    CURRENT.with(|c| *c.borrow_mut() = Some(flag));
}

/// The connector that wraps each transport ureq makes (after TCP and TLS).
#[derive(Debug)]
pub(crate) struct Cancellable;

impl Connector<Box<dyn Transport>> for Cancellable {
    type Out = CancellableTransport;

    fn connect(
        &self,
        _details: &ConnectionDetails,
        chained: Option<Box<dyn Transport>>,
    ) -> Result<Option<Self::Out>, Error> {
        Ok(chained.map(|inner| CancellableTransport { inner }))
    }
}

#[derive(Debug)]
pub(crate) struct CancellableTransport {
    inner: Box<dyn Transport>,
}

impl Transport for CancellableTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        self.inner.transmit_output(amount, timeout)
    }

    /// On a thread without a flag, exactly the inner wait. With one, the same deadline waited
    /// in slices, the flag checked between them. A slice that times out consumed nothing, so
    /// the wait simply goes on.
    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let Some(flag) = CURRENT.with(|c| c.borrow().clone()) else {
            return self.inner.await_input(timeout);
        };
        let real = timeout.for_read();
        let started = Instant::now();
        loop {
            if flag.load(Ordering::Acquire) {
                return Err(Error::Io(io::Error::other("upstream read cancelled")));
            }
            let left = (!real.after.is_not_happening())
                .then(|| real.after.saturating_sub(started.elapsed()));
            if left.is_some_and(|l| l <= SLICE) {
                let mut last = real;
                last.after = left.unwrap_or_default().into();
                return self.inner.await_input(last);
            }
            let mut slice = real;
            slice.after = SLICE.into();
            slice.per_read = None;
            match self.inner.await_input(slice) {
                Err(Error::Timeout(_)) => continue,
                other => return other,
            }
        }
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}
