//! Whether the database can be reached: the `sg-db-probe` thread asks it `SELECT 1` every
//! second on a connection of its own (`own.rs`), so a pool whose connections are all taken is
//! not mistaken for a database that is gone. While it cannot, calls that need the database fail at once
//! with `store_unavailable` instead of each waiting out the pool's timeout, `/readyz` says so,
//! and the log writer holds its batch; the first probe that gets through ends all of that, so
//! the server recovers by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::Own;
use crate::store::Background;

/// Between two probes.
const EVERY: Duration = Duration::from_secs(1);

/// The probe's verdict, shared with every caller, and its thread.
pub(super) struct Probe {
    up: Arc<AtomicBool>,
    thread: Background,
}

impl Probe {
    /// Starts probing, keeping the verdict in `up` (true at open: the database answered a
    /// moment ago). The pool's error handler clears `up` too, as a connection attempt fails.
    pub(super) fn spawn(
        mut own: Own,
        up: Arc<AtomicBool>,
        endpoint: String,
    ) -> std::io::Result<Probe> {
        let flag = Arc::clone(&up);
        let thread = Background::spawn("sg-db-probe", move |stopped| {
            run(&mut own, &flag, &stopped, &endpoint);
        })?;
        Ok(Probe { up, thread })
    }

    /// A handle on the verdict, for the log writer.
    pub(super) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.up)
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Marks the database unreachable at once (a call found its connection dead); the next
    /// probe that gets through marks it back.
    pub(super) fn lost(&self) {
        self.up.store(false, Ordering::SeqCst);
    }

    pub(super) fn stop(&self) {
        self.thread.stop();
    }
}

fn run(own: &mut Own, up: &AtomicBool, stopped: &Receiver<()>, endpoint: &str) {
    loop {
        let ask = |own: &mut Own| own.query(|c| c.execute("SELECT 1", &[])).is_ok();
        // A kept connection found broken (the server restarted) is opened again at once.
        let had = own.is_open();
        let reachable = ask(own) || (had && ask(own));
        let was = up.swap(reachable, Ordering::SeqCst);
        match (was, reachable) {
            (true, false) => log::warn!(
                "database {endpoint} cannot be reached: calls that need it get 503 \
                 store_unavailable until it answers again"
            ),
            (false, true) => log::info!("database {endpoint} answers again"),
            _ => {}
        }
        if !matches!(stopped.recv_timeout(EVERY), Err(RecvTimeoutError::Timeout)) {
            return;
        }
    }
}
