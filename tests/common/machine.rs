//! What the tests need from the machine rather than from cargo (nginx, a Python with venv, …),
//! and one rule for when it is missing: a run that must test everything fails, any other run
//! skips the test and says so. `scripts/test` installs all of it.

use std::env;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The command that installs and starts everything the tests need.
pub const SET_UP_EVERYTHING: &str = "./scripts/test";

/// `found` when the machine has the component; otherwise the test must not go on.
///
/// A missing component fails the test (one line naming the Debian `package`) in a run that
/// must test everything: `CI` set (as CI services set it), or `SYNCGATE_REQUIRE_ALL=1` (as
/// `scripts/test` sets it). Any other run gets `None` and one line on stderr saying what was
/// skipped and how to set everything up, so a bare `cargo test` passes the rest.
pub fn require<T>(what: &str, package: &str, found: Option<T>) -> Option<T> {
    if found.is_some() {
        return found;
    }
    if must_test_everything() {
        panic!(
            "{what} is missing: install it with `apt-get install {package}` \
             (or run {SET_UP_EVERYTHING}, which installs everything the tests need)"
        );
    }
    let test = thread::current().name().unwrap_or("a test").to_string();
    // Straight to the stream: the test harness captures only the print macros, and a skip
    // must be seen.
    let _ = writeln!(
        io::stderr(),
        "skipped {test}: {what} is not installed (apt-get install {package}); \
         {SET_UP_EVERYTHING} sets up everything the tests need"
    );
    None
}

/// Whether this run promised to run every test: in CI, or under `scripts/test`.
pub fn must_test_everything() -> bool {
    let ci = env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    ci || env::var("SYNCGATE_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// The first of `candidates` that exists, or the first `name` on `PATH`.
pub fn find_program(name: &str, candidates: &[&str]) -> Option<PathBuf> {
    let listed = candidates.iter().map(PathBuf::from);
    let on_path: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).map(|dir| dir.join(name)).collect())
        .unwrap_or_default();
    listed.chain(on_path).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `program args…` runs and exits 0, its output discarded.
pub fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Stops a program a test started, and only it: SIGTERM first, so it can stop what it started
/// itself (nginx's workers), then SIGKILL if it has not exited within `grace`. Reaps it.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not reaped yet, so the pid is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
