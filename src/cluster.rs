//! This process as one of the instances serving a database. On PostgreSQL it registers at start
//! (a fresh id, host name, listen address, version) and the `sg-lease` thread renews its lease,
//! timed by the database clock, and reaps the instances whose lease ran out, which frees the
//! in-flight slots they held. An instance that cannot renew stops admitting keyed work until it
//! has registered again (`Instance::is_registered`). On SQLite nothing is registered: one
//! process per file, and `/admin/instances` shows this one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use crate::store::instances::{self, Connection, InstanceRow, NewInstance};
use crate::store::{Background, Store, StoreError};

/// Who this process is, and whether it holds a live lease.
#[derive(Debug)]
pub(crate) struct Instance {
    id: RwLock<String>,
    pub(crate) host: String,
    pub(crate) listen: String,
    pub(crate) version: &'static str,
    started_ms: i64,
    registered: AtomicBool,
}

impl Instance {
    /// This process, not registered yet, with a fresh id.
    pub(crate) fn new(listen: String) -> Instance {
        Instance {
            id: RwLock::new(fresh_id()),
            host: host_name(),
            listen,
            version: env!("CARGO_PKG_VERSION"),
            started_ms: crate::store::now_ms(),
            registered: AtomicBool::new(false),
        }
    }

    /// The id it registered (or will register) under.
    pub(crate) fn id(&self) -> String {
        self.id
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether its last registration or renewal went through and no admission since found its
    /// lease gone.
    pub(crate) fn is_registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }

    /// Marks the lease lost (an admission was told so); the lease thread registers again.
    pub(crate) fn lost(&self) {
        self.registered.store(false, Ordering::SeqCst);
    }

    /// This process as a row, for `/admin/instances` on SQLite.
    pub(crate) fn row(&self) -> InstanceRow {
        InstanceRow {
            id: self.id(),
            host: self.host.clone(),
            listen: self.listen.clone(),
            version: self.version.to_string(),
            started_ms: self.started_ms,
            renewed_ms: crate::store::now_ms(),
            lease_until_ms: i64::MAX,
        }
    }

    fn as_new(&self) -> NewInstance {
        NewInstance {
            id: self.id(),
            host: self.host.clone(),
            listen: self.listen.clone(),
            version: self.version.to_string(),
        }
    }
}

/// The `sg-lease` thread of a registered instance.
pub(crate) struct Lease {
    instance: Arc<Instance>,
    store: Store,
    thread: Background,
}

impl Lease {
    /// Registers `instance` with a lease of `lease` and starts renewing it every fifth of it,
    /// on a connection of its own whose statements may take that fifth at most: a renewal
    /// never waits for the pool, and one tick never outlasts the next.
    pub(crate) fn start(
        instance: Arc<Instance>,
        store: &Store,
        lease: Duration,
    ) -> anyhow::Result<Lease> {
        let lease_ms = lease.as_millis() as i64;
        let mut conn = instances::connection(store, lease / 5)
            .map_err(|e| anyhow::anyhow!("cannot register this instance: {e}"))?;
        instances::register(&mut conn, &instance.as_new(), lease_ms)
            .map_err(|e| anyhow::anyhow!("cannot register this instance: {e}"))?;
        instance.registered.store(true, Ordering::SeqCst);
        log::info!(
            "instance {} registered (lease {} ms, renewed every {} ms)",
            instance.id(),
            lease_ms,
            lease_ms / 5
        );
        let thread = {
            let instance = Arc::clone(&instance);
            let mut failing = false;
            Background::spawn("sg-lease", move |stopped| loop {
                if !matches!(
                    stopped.recv_timeout(lease / 5),
                    Err(RecvTimeoutError::Timeout)
                ) {
                    return;
                }
                keep(&instance, &mut conn, lease_ms, &mut failing);
            })?
        };
        Ok(Lease {
            instance,
            store: store.clone(),
            thread,
        })
    }

    /// Stops renewing and removes the registration (a clean stop: nothing is in flight).
    pub(crate) fn stop(&self) {
        self.thread.stop();
        if let Err(e) = instances::deregister(&self.store, &self.instance.id()) {
            log::warn!("cannot remove this instance's registration: {e}");
        }
    }
}

/// One tick: renew (or register again), then reap the dead. `failing` says whether the last
/// tick failed, so a run of failures is logged once, however the lease was found lost (by
/// this thread or by an admission).
fn keep(instance: &Instance, conn: &mut Connection, lease_ms: i64, failing: &mut bool) {
    let renewed = match instances::renew(conn, &instance.id(), lease_ms) {
        Ok(true) => Ok(()),
        Ok(false) => {
            // The lease ran out (or was reaped): its slots are gone, so start afresh.
            *instance.id.write().unwrap_or_else(PoisonError::into_inner) = fresh_id();
            instances::register(conn, &instance.as_new(), lease_ms)
        }
        Err(e) => Err(e),
    };
    let was = instance.registered.swap(renewed.is_ok(), Ordering::SeqCst);
    match &renewed {
        Err(e) if !*failing => log::warn!(
            "instance {} cannot renew its lease ({e}): keyed requests get 503 \
             store_unavailable until it has registered again",
            instance.id()
        ),
        Ok(()) if !was => log::info!("instance {} registered again", instance.id()),
        _ => {}
    }
    *failing = renewed.is_err();
    if renewed.is_ok() {
        match instances::reap(conn) {
            Ok(reaped) if reaped.instances > 0 || reaped.slots > 0 => log::info!(
                "reaped {} instances whose lease ran out, freed {} in-flight slots",
                reaped.instances,
                reaped.slots
            ),
            Ok(_) => {}
            Err(e) => log::debug!("cannot reap instances: {e}"),
        }
    }
}

/// The live instances: from the database on PostgreSQL, this one alone on SQLite.
pub(crate) fn live(store: &Store, me: &Instance) -> Result<Vec<InstanceRow>, StoreError> {
    match store.backend() {
        crate::store::Backend::Sqlite(_) => Ok(vec![me.row()]),
        crate::store::Backend::Postgres(_) => instances::live(store),
    }
}

fn fresh_id() -> String {
    crate::store::new_id("inst")
}

/// The machine's host name, or `unknown`.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours and its length is passed; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
