//! `cargo bench`: a short run of `syncgate bench` on the optimised binary (overhead, throughput
//! and /healthz under saturation, 2 s per phase), printing its table. The full bench, with every
//! scenario, is `cargo run --release -- bench` (docs/benchmarks.md).

use std::process::{Command, ExitCode, Stdio};

fn main() -> ExitCode {
    let bin = env!("CARGO_BIN_EXE_syncgate");
    let mut cmd = Command::new(bin);
    cmd.args([
        "bench",
        "--scenarios",
        "overhead,throughput,saturated-health",
        "--duration-s",
        "2",
    ]);
    // Settings come from the bench alone, never from the caller's environment.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SYNCGATE_") {
            cmd.env_remove(&key);
        }
    }
    match cmd.stdin(Stdio::null()).status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("benches/gateway: {bin} bench exited with {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("benches/gateway: cannot run {bin}: {e}");
            ExitCode::FAILURE
        }
    }
}
