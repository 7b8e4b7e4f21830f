//! How glibc's allocator is set up for a server with thousands of threads.
//!
//! syncgate runs a thread per connection and a thread per worker, so 1,000 requests in
//! flight are 2,000 threads. glibc keeps a per-thread cache of freed small chunks (tcache, up
//! to 7 per size class) that only its own thread reuses, so that memory grows with the thread
//! count, not with the work. Measured with the bench's slow-ai scenario (1,000 clients, the
//! gateway's peak resident memory): 100.0 MB with the cache, 86.8 MB without; CPU per request
//! at 64 clients was the same within noise (117–123 µs without against 120–125 µs with).
//! (Limiting the malloc arenas to two, by contrast, changed nothing: 86.8 against 87.2 MB.)
//!
//! The cache can only be switched off through the `GLIBC_TUNABLES` variable, which glibc
//! reads when the process starts. So `serve` starts itself once more with the variable set,
//! unless it already names the cache (the operator's own setting always wins).

/// Replaces this process (same pid, arguments and descriptors) with itself started with the
/// per-thread cache off. Returns only if that was not needed or not possible, in which case
/// the server simply runs with glibc's default. Call before any thread starts.
pub(crate) fn reexec_without_thread_caches() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;

        let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let Some(tunables) = with_thread_caches_off(&current) else {
            return;
        };
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_default();
        // /proc/self/exe is this very binary even if the file was replaced since it started.
        let _ = std::process::Command::new("/proc/self/exe")
            .arg0(argv0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .exec();
    }
}

/// The `GLIBC_TUNABLES` value with the per-thread cache off, keeping what was there; `None`
/// if the value already sets the cache.
fn with_thread_caches_off(current: &str) -> Option<String> {
    const SETTING: &str = "glibc.malloc.tcache_count";
    if current.contains(SETTING) {
        None
    } else if current.is_empty() {
        Some(format!("{SETTING}=0"))
    } else {
        Some(format!("{current}:{SETTING}=0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_setting_is_added_to_other_tunables_and_never_overrides_one_given() {
        assert_eq!(
            with_thread_caches_off("").as_deref(),
            Some("glibc.malloc.tcache_count=0")
        );
        assert_eq!(
            with_thread_caches_off("glibc.malloc.arena_max=2").as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0")
        );
        assert_eq!(with_thread_caches_off("glibc.malloc.tcache_count=3"), None);
    }
}
