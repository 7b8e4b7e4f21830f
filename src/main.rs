//! syncgate: a single-binary AI gateway built on plain threads and blocking calls, with every
//! capacity limit explicit. Start-up is a straight line: args → config → logging → server →
//! wait for a signal → shutdown. Errors are reported once, here at the edge.

mod api;
mod config;
mod http;
mod metrics;
mod providers;
mod server;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use config::{Config, Overrides};

#[derive(Parser)]
#[command(
    name = "syncgate",
    version,
    about = "A single-binary AI gateway: plain threads, blocking calls, explicit capacity"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (defaults: 127.0.0.1:8080, the built-in mock model).
    Serve(ServeArgs),
}

/// Every flag also reads `SYNCGATE_<NAME>`; a flag wins over the variable, both over the file.
#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "SYNCGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one) [default: 127.0.0.1:8080].
    #[arg(long, env = "SYNCGATE_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// SQLite database file [default: ./syncgate.db].
    #[arg(long, env = "SYNCGATE_DB", value_name = "PATH")]
    db: Option<PathBuf>,
    /// Worker threads: the most requests (and streams) served at once [default: 256].
    #[arg(long, env = "SYNCGATE_WORKERS", value_name = "N")]
    workers: Option<usize>,
    /// Queue slots in front of the workers; when full → 503 [default: 128].
    #[arg(long, env = "SYNCGATE_QUEUE", value_name = "N")]
    queue: Option<usize>,
    /// Longest a request may wait for a worker before it is refused [default: 5000].
    #[arg(long, env = "SYNCGATE_MAX_QUEUE_WAIT_MS", value_name = "MS")]
    max_queue_wait_ms: Option<u64>,
    /// Most open client connections; more are answered 503 and closed [default: 1024].
    #[arg(long, env = "SYNCGATE_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,
    /// Largest request body; larger → 413 [default: 4194304].
    #[arg(long, env = "SYNCGATE_MAX_BODY_BYTES", value_name = "BYTES")]
    max_body_bytes: Option<u64>,
    /// Deadline for a whole request head → else 408 [default: 10000].
    #[arg(long, env = "SYNCGATE_HEADER_TIMEOUT_MS", value_name = "MS")]
    header_timeout_ms: Option<u64>,
    /// Longest silence while a body arrives → else 408 [default: 10000].
    #[arg(long, env = "SYNCGATE_BODY_TIMEOUT_MS", value_name = "MS")]
    body_timeout_ms: Option<u64>,
    /// Idle keep-alive connections are closed after this [default: 75000].
    #[arg(long, env = "SYNCGATE_KEEPALIVE_TIMEOUT_MS", value_name = "MS")]
    keepalive_timeout_ms: Option<u64>,
    /// Longest one socket write may block [default: 10000].
    #[arg(long, env = "SYNCGATE_WRITE_TIMEOUT_MS", value_name = "MS")]
    write_timeout_ms: Option<u64>,
    /// Time in-flight work gets to finish after SIGTERM/SIGINT [default: 30000].
    #[arg(long, env = "SYNCGATE_SHUTDOWN_GRACE_MS", value_name = "MS")]
    shutdown_grace_ms: Option<u64>,
    /// Latency of the built-in mock model [default: 0].
    #[arg(long, env = "SYNCGATE_MOCK_LATENCY_MS", value_name = "MS")]
    mock_latency_ms: Option<u64>,
    /// Serve POST /debug/panic (for tests of panic handling).
    #[arg(long, hide = true)]
    enable_debug_routes: bool,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            db: self.db.clone(),
            workers: self.workers,
            queue: self.queue,
            max_queue_wait_ms: self.max_queue_wait_ms,
            max_connections: self.max_connections,
            max_body_bytes: self.max_body_bytes,
            header_timeout_ms: self.header_timeout_ms,
            body_timeout_ms: self.body_timeout_ms,
            keepalive_timeout_ms: self.keepalive_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            shutdown_grace_ms: self.shutdown_grace_ms,
            mock_latency_ms: self.mock_latency_ms,
            debug_routes: self.enable_debug_routes,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("syncgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(&args),
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args.config.as_deref(), &args.overrides())?;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    // Signals are caught before we say we are listening, so a SIGTERM right after the
    // readiness line is already a graceful shutdown.
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    let (first_signal, on_signal) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("sg-signals".into())
        .spawn(move || watch_signals(signals, first_signal))
        .context("cannot start the signal thread")?;

    log::info!(
        "database {} (not used yet: storage is not built)",
        config.db.display()
    );
    let server = server::Server::start(config)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", server.local_addr())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    drop(stdout);

    let signal = on_signal.recv().unwrap_or(signal_hook::consts::SIGTERM);
    log::info!(
        "received signal {signal}: shutting down gracefully (a second signal exits at once)"
    );
    server.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// Forwards the first SIGTERM/SIGINT to main; a second one ends the process at once.
fn watch_signals(
    mut signals: signal_hook::iterator::Signals,
    first: crossbeam_channel::Sender<i32>,
) {
    let mut seen = false;
    for signal in signals.forever() {
        if seen {
            eprintln!("syncgate: second signal ({signal}): exiting at once");
            std::process::exit(130);
        }
        seen = true;
        let _ = first.send(signal);
    }
}
