//! syncgate: a single-binary AI gateway built on plain threads and blocking calls, with every
//! capacity limit explicit. Start-up is a straight line: args → config → logging → server →
//! wait for a signal → shutdown. Errors are reported once, here at the edge.

mod api;
mod auth;
mod batch;
mod bench;
mod cluster;
mod config;
mod database;
mod http;
mod ingest;
mod jobs;
mod knowledge;
mod limits;
mod malloc;
mod metrics;
mod mock_upstream;
mod providers;
mod server;
mod spend;
mod store;
mod time;
mod tokens;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use config::{Config, Overrides};
use database::Database;

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
    /// Run an OpenAI-compatible fake provider that misbehaves on cue (for development, tests
    /// and load tests; see docs/mock-upstream.md).
    MockUpstream(MockUpstreamArgs),
    /// Load-test syncgate against its own mock upstream and report each figure against its
    /// goal (see docs/benchmarks.md; build with --release first).
    Bench(bench::BenchArgs),
    /// Create the database or bring its schema up to date (serve does this at start too).
    Migrate(DbArgs),
    /// Print calls, errors and tokens from the request log, by model or by UTC day (the
    /// totals of GET /api/usage; reads the database without changing it).
    Usage(UsageArgs),
    /// Make, list and revoke API keys in the database (a running server notices within a
    /// second). A new key is printed once and never stored: only its hash is.
    Keys(KeysArgs),
}

#[derive(Args)]
struct KeysArgs {
    /// The database: a SQLite file, or postgres://user@host/db (password from the URL or
    /// PGPASSWORD).
    #[arg(
        long,
        global = true,
        env = "SYNCGATE_DB",
        hide_env_values = true,
        value_name = "PATH|URL",
        default_value = "./syncgate.db",
        value_parser = DbParser
    )]
    db: Database,
    #[command(subcommand)]
    action: KeysAction,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make a key and print it (the only time it is shown).
    Create {
        /// What the key is for (shown in lists and usage).
        #[arg(long)]
        name: String,
        /// Models the key may call, comma-separated [default: every model].
        #[arg(long, value_delimiter = ',', value_name = "A,B,…")]
        models: Vec<String>,
        /// Requests per minute at most (a sliding minute).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rpm: Option<u32>,
        /// Tokens per minute at most (estimated at admission, then as the provider reports).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        tpm: Option<u64>,
        /// Requests in flight at once at most.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_in_flight: Option<u32>,
        /// When the key stops working: unix seconds or RFC 3339.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        expires_at: Option<i64>,
    },
    /// List every key (never a secret).
    List,
    /// Revoke a key by id.
    Revoke { id: i64 },
}

#[derive(Args)]
struct DbArgs {
    /// The database: a SQLite file, or postgres://user@host/db (password from the URL or
    /// PGPASSWORD).
    #[arg(
        long,
        env = "SYNCGATE_DB",
        hide_env_values = true,
        value_name = "PATH|URL",
        default_value = "./syncgate.db",
        value_parser = DbParser
    )]
    db: Database,
}

#[derive(Args)]
struct UsageArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Totals per `model`, per `day` (UTC) or per API `key`.
    #[arg(long, value_name = "model|day|key", default_value = "model")]
    group_by: store::usage::GroupBy,
    /// Only calls logged at or after this time: unix seconds or RFC 3339 (2026-11-23T10:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<i64>,
    /// Only calls logged before this time: unix seconds or RFC 3339.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<i64>,
}

/// `--db` (or `SYNCGATE_DB`) read by `Database::parse`. Not a plain function parser: clap
/// quotes a refused value in its error, and a database URL may hold a password.
#[derive(Clone)]
struct DbParser;

impl clap::builder::TypedValueParser for DbParser {
    type Value = Database;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Database, clap::Error> {
        let refuse = |why: &str| {
            let arg = arg.map_or_else(|| "--db".to_string(), ToString::to_string);
            let message = format!(
                "invalid value for '{arg}' (not repeated: it may hold a password): {why}\n"
            );
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("is not UTF-8"))?;
        Database::parse(text).map_err(|why| refuse(&why))
    }
}

/// An instant on the command line, as unix ms.
fn parse_time(text: &str) -> Result<i64, String> {
    time::parse_instant(text).ok_or_else(|| format!("expected {}", time::INSTANT_FORMS))
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
    /// The database: a SQLite file, or postgres://user@host/db (password from the URL or
    /// PGPASSWORD) [default: ./syncgate.db].
    #[arg(
        long,
        env = "SYNCGATE_DB",
        hide_env_values = true,
        value_name = "PATH|URL"
    )]
    db: Option<String>,
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
    /// Serve without API keys on a non-loopback address while none exists (otherwise such a
    /// server refuses to start). The admin key is read from SYNCGATE_ADMIN_KEY only.
    #[arg(long)]
    allow_open: bool,
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
            allow_open: self.allow_open,
        }
    }
}

#[derive(Args)]
struct MockUpstreamArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    listen: String,
    /// Time to the response head of every /v1 request.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    latency_ms: u64,
    /// Content chunks in a streamed chat reply.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    stream_chunks: u64,
    /// Gap between consecutive events of a streamed reply.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    stream_interval_ms: u64,
    /// Fault for every request (the `x-mock-fault` header overrides it): none,
    /// status=CODE[,retry-after=S], hang, slow-head=MS, stall-after=K, truncate-after=K,
    /// malformed, reset, error-event.
    #[arg(long, value_name = "SPEC", default_value = "none")]
    fault: mock_upstream::Fault,
}

impl MockUpstreamArgs {
    fn options(&self) -> anyhow::Result<mock_upstream::Options> {
        let listen = resolve(&self.listen)
            .with_context(|| format!("invalid --listen address {:?}", self.listen))?;
        Ok(mock_upstream::Options {
            listen,
            latency: Duration::from_millis(self.latency_ms),
            stream_chunks: self.stream_chunks as usize,
            stream_interval: Duration::from_millis(self.stream_interval_ms),
            fault: self.fault,
        })
    }
}

/// `host:port`, a literal address or a name such as `localhost:9090`.
fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    text.to_socket_addrs()?
        .next()
        .context("resolves to no address")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        malloc::reexec_without_thread_caches();
    }
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
        Command::MockUpstream(args) => mock_upstream(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Migrate(args) => migrate(&args),
        Command::Keys(args) => keys(&args),
        Command::Usage(args) => usage(&args),
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args.config.as_deref(), &args.overrides())?;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Signals are caught before we say we are listening, so a SIGTERM right after the
    // readiness line is already a graceful shutdown.
    let on_signal = catch_signals()?;

    // The admin key comes from the environment only: a flag would show in `ps`.
    let admin_key = std::env::var("SYNCGATE_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let server = server::Server::start(config, admin_key.as_deref())?;
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

/// `syncgate migrate`: applies what migrations the file lacks and says what it did.
/// `syncgate keys`: the same changes as `/admin/keys`, on the file directly.
fn keys(args: &KeysArgs) -> anyhow::Result<ExitCode> {
    // The same store a server opens (migrated, one writer): a change and the generation bump
    // that announces it to running servers commit together.
    let store = store::Store::open(
        &args.db,
        &Config::default().store,
        store::Keep::default(),
        metrics::Metrics::new().store,
    )?;
    let done = keys_action(&store, &args.action);
    store.close();
    done
}

fn keys_action(store: &store::Store, action: &KeysAction) -> anyhow::Result<ExitCode> {
    use store::keys;
    match action {
        KeysAction::Create {
            name,
            models,
            rpm,
            tpm,
            max_in_flight,
            expires_at,
        } => {
            anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
            let new = keys::NewKey {
                name: name.clone(),
                models: (!models.is_empty()).then(|| models.clone()),
                rpm: *rpm,
                tpm: *tpm,
                max_in_flight: *max_in_flight,
                expires_ms: *expires_at,
            };
            let made = keys::make(new, store::now_ms())
                .map_err(|e| anyhow::anyhow!("cannot draw random bytes: {e}"))?;
            let id = keys::insert(store, made.stored)?;
            println!("{}", made.secret);
            eprintln!("API key {id} ({name}) created; the line above is the key, shown this once");
        }
        KeysAction::List => {
            println!("id  prefix        status   name");
            let now = store::now_ms();
            for k in keys::all(store)? {
                let status = if k.revoked_ms.is_some() {
                    "revoked"
                } else if k.expires_ms.is_some_and(|at| at <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!("{:<3} {:<13} {:<8} {}", k.id, k.prefix, status, k.name);
            }
        }
        KeysAction::Revoke { id } => {
            if keys::revoke(store, *id, store::now_ms())? {
                println!("API key {id} revoked");
            } else if keys::get(store, *id)?.is_some() {
                println!("API key {id} was already revoked");
            } else {
                anyhow::bail!("no API key with id {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn migrate(args: &DbArgs) -> anyhow::Result<ExitCode> {
    let (from, to) = store::migrate(&args.db)?;
    if from == to {
        println!("{}: schema version {to} is up to date", args.db);
    } else {
        println!("{}: migrated schema version {from} -> {to}", args.db);
    }
    Ok(ExitCode::SUCCESS)
}

/// `syncgate usage`: the request log's totals as a table on stdout.
fn usage(args: &UsageArgs) -> anyhow::Result<ExitCode> {
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if since >= until {
            anyhow::bail!("--until must be later than --since");
        }
    }
    let range = store::requests::TimeRange {
        since_ms: args.since,
        until_ms: args.until,
    };
    let totals = store::usage::summarise_at(&args.db.db, args.group_by, range)
        .with_context(|| format!("cannot read usage from {}", args.db.db))?;
    print!("{}", store::usage::table(args.group_by, &totals));
    Ok(ExitCode::SUCCESS)
}

/// `syncgate mock-upstream`: start, say where, serve until SIGTERM/SIGINT, then exit at once
/// (held and stalled connections close with the process).
fn mock_upstream(args: &MockUpstreamArgs) -> anyhow::Result<ExitCode> {
    let options = args.options()?;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let on_signal = catch_signals()?;
    let addr = mock_upstream::start(options)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{addr}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    drop(stdout);
    let signal = on_signal.recv().unwrap_or(signal_hook::consts::SIGTERM);
    log::info!("received signal {signal}: stopping");
    Ok(ExitCode::SUCCESS)
}

/// Starts the thread that watches SIGTERM/SIGINT; the first one arrives on the returned channel.
fn catch_signals() -> anyhow::Result<crossbeam_channel::Receiver<i32>> {
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
    Ok(on_signal)
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
