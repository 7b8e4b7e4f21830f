//! The official OpenAI Python SDK, unchanged, against the real binary: tests/sdk/openai_sdk_check.py
//! drives chat (plain, streamed, and proxied through a second syncgate), embeddings, models,
//! the knowledge base (files.create, vector_stores.create, vector_stores.files.upload_and_poll,
//! vector_stores.search, responses.create with file_search and its citation) and the SDK's
//! error classes. The SDK comes from `SYNCGATE_SDK_PYTHON` or a cached virtualenv.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_check.py");
const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/requirements.txt");
/// Creating the virtualenv and installing the SDK into it, together.
const SETUP_DEADLINE: Duration = Duration::from_secs(300);
/// The whole check script (each of its requests has its own 20 s timeout).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);
const HOW_TO_FIX: &str = "\
The OpenAI SDK test needs a Python with the SDK. Either
  - install python3 and, on Debian or Ubuntu, python3-venv (`apt-get install python3 python3-venv`),
    and let PyPI be reachable, so the test can make target/sdk-venv itself; or
  - point SYNCGATE_SDK_PYTHON at a Python that has `pip install -r tests/sdk/requirements.txt`.";

#[test]
fn openai_python_sdk_works_unchanged() {
    let Some((python, source)) = sdk_python() else {
        return;
    };
    let upstream = Server::start(&[]);
    let gateway = Server::start_with_config(&gateway_config(upstream.addr), &[]);

    let mut script = Command::new(&python);
    script
        .arg("-u")
        .arg(SCRIPT)
        .arg(format!("http://{}/v1", gateway.addr));
    // The SDK's HTTP client honours proxy variables; requests to 127.0.0.1 must stay here.
    for var in ["http_proxy", "https_proxy", "all_proxy"] {
        script.env_remove(var).env_remove(var.to_uppercase());
    }
    let run = run_bounded(script, SCRIPT_DEADLINE)
        .unwrap_or_else(|e| panic!("cannot run {} ({source}): {e}", python.display()));
    let hint = if run.output.contains("No module named") {
        format!("\n{HOW_TO_FIX}")
    } else {
        String::new()
    };
    assert!(
        run.succeeded(),
        "expected every OpenAI SDK check to pass (python {}, {source}); got {}:\n{}{hint}",
        python.display(),
        run.describe_status(),
        run.output
    );
    println!("{}", run.output);

    let proxied = upstream
        .log()
        .matches("POST /v1/chat/completions 200")
        .count();
    assert!(
        proxied >= 2,
        "expected the proxied checks (plain and streamed) to reach the upstream syncgate; it answered {proxied} chat requests"
    );
}

/// The gateway's models: `proxied` goes through the OpenAI provider to `upstream`'s mock, and
/// `unavailable` names a key variable that is never set.
fn gateway_config(upstream: SocketAddr) -> String {
    format!(
        r#"
[[providers]]
name = "local"
type = "openai"
base_url = "http://{upstream}/v1"

[[providers]]
name = "nokey"
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "SYNCGATE_SDK_TEST_KEY_THAT_IS_NEVER_SET"

[[models]]
name = "proxied"
targets = ["local/mock"]

[[models]]
name = "unavailable"
targets = ["nokey/x"]
"#
    )
}

/// The Python to run the script with, and where it came from; `None` when the test is skipped
/// for want of a Python that can make a virtualenv (see `require`).
fn sdk_python() -> Option<(PathBuf, &'static str)> {
    if let Some(p) = std::env::var_os("SYNCGATE_SDK_PYTHON").filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), "from SYNCGATE_SDK_PYTHON"));
    }
    // Debian's python3 makes a virtualenv only with python3-venv, where its ensurepip lives.
    let can_make_venv = succeeds("python3", &["-c", "import ensurepip, venv"]);
    require(
        "python3 with venv",
        "python3-venv",
        can_make_venv.then_some(()),
    )?;
    match cached_venv() {
        Ok(python) => Some((python, "from the cached target/sdk-venv")),
        Err(e) => panic!("cannot set up the OpenAI Python SDK: {e}\n\n{HOW_TO_FIX}"),
    }
}

/// `target/sdk-venv` with tests/sdk/requirements.txt installed, made on first use and remade
/// when the requirements change. A lock file keeps concurrent test processes from building it
/// twice; the stamp is written last, so a half-built venv is rebuilt.
fn cached_venv() -> Result<PathBuf, String> {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory");
    let venv = target.join("sdk-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join("requirements.installed");
    let requirements =
        fs::read_to_string(REQUIREMENTS).map_err(|e| format!("cannot read {REQUIREMENTS}: {e}"))?;

    let deadline = Instant::now() + SETUP_DEADLINE;
    // Another process may be building it: wait out its whole setup budget, and a little more.
    let _lock = lock(
        &target.join("sdk-venv.lock"),
        deadline + Duration::from_secs(30),
    )?;
    if fs::read_to_string(&stamp).is_ok_and(|s| s == requirements) {
        return Ok(python);
    }
    if venv.exists() {
        fs::remove_dir_all(&venv).map_err(|e| format!("cannot remove {}: {e}", venv.display()))?;
    }
    let mut create = Command::new("python3");
    create.arg("-m").arg("venv").arg(&venv);
    run_step(create, deadline)?;
    let mut install = Command::new(&python);
    install
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-r"])
        .arg(REQUIREMENTS);
    run_step(install, deadline)?;
    fs::write(&stamp, &requirements)
        .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    Ok(python)
}

/// Runs one setup command within what is left of `deadline`; an error says what failed and why.
fn run_step(cmd: Command, deadline: Instant) -> Result<(), String> {
    let line = format!("{cmd:?}");
    let run = run_bounded(cmd, deadline.saturating_duration_since(Instant::now()))
        .map_err(|e| format!("cannot run {line}: {e}"))?;
    if run.succeeded() {
        Ok(())
    } else {
        Err(format!("{line} {}:\n{}", run.describe_status(), run.output))
    }
}

/// Takes an exclusive `flock` on `path`, polling until `deadline`; released when the file closes.
fn lock(path: &Path, deadline: Instant) -> Result<File, String> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    loop {
        // SAFETY: flock(2) on the descriptor of `file`, which stays open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock {
            return Err(format!("cannot lock {}: {err}", path.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} is still locked by another test process setting up the SDK",
                path.display()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A finished (or killed) child process and everything it printed, stdout then stderr.
struct Run {
    /// `None` when it was still running at the deadline and was killed.
    status: Option<ExitStatus>,
    deadline: Duration,
    output: String,
}

impl Run {
    fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn describe_status(&self) -> String {
        match self.status {
            Some(s) => s.to_string(),
            None => format!(
                "still running after {:?} (killed by the test)",
                self.deadline
            ),
        }
    }
}

/// Runs `cmd` in its own process group and kills the group if it outlives `deadline`, so a
/// stalled pip or SDK call fails the test instead of hanging it.
fn run_bounded(mut cmd: Command, deadline: Duration) -> io::Result<Run> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let stdout = read_all(child.stdout.take().expect("stdout is piped"));
    let stderr = read_all(child.stderr.take().expect("stderr is piped"));
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= end {
            let pgid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) on the process group this function created for its unreaped child.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            child.wait()?;
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut output = stdout.join().unwrap_or_default();
    output.push_str(&stderr.join().unwrap_or_default());
    Ok(Run {
        status,
        deadline,
        output,
    })
}

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
