//! `syncgate bench`: the load test shipped in the binary. It starts its own mock upstream and
//! its own gateway (this same executable), drives them with a closed-loop load generator on
//! plain threads, measures every scenario against the same upstream hit directly in the same
//! run, and reports ratios against the performance goals (docs/benchmarks.md).

mod client;
mod cluster;
mod hist;
mod latency_zero;
mod load;
mod observe;
mod postgres;
mod procs;
mod report;
mod scenarios;
mod search;
mod store;
mod streams;
mod svg;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use load::{Load, LoadResult, LoadSpec};
use procs::{Fleet, GatewaySpec, MockSpec};
use report::Outcome;

/// The scenarios, in the order they run (those sharing a gateway configuration are adjacent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum Scenario {
    /// Time syncgate adds to one client's request (latency 0).
    Overhead,
    /// Requests per second with 64 clients, through syncgate ÷ direct (latency 0).
    Throughput,
    /// Latency and throughput at 1, 8, 64 and 256 clients (latency 0): the SVG's data.
    Sweep,
    /// Little's-law efficiency and memory with --clients callers on a 500 ms upstream.
    SlowAi,
    /// /healthz latency while every worker is busy and the queue is full.
    SaturatedHealth,
    /// Goodput and time to a 503 with 10× the configured capacity offered.
    Overload,
    /// --streams concurrent SSE streams: stalls and added time to first token.
    Streams,
    /// Requests per second with the request log on ÷ off (64 clients, latency 0).
    Logging,
    /// The database writer alone: rows/s with group commit against a transaction per row.
    Writer,
    /// Keyed requests/s through the shared limiter of --instances gateways on one PostgreSQL
    /// (needs --db), against SQLite's in-process limits.
    Cluster,
    /// Vector-store search p50/p99 over 10k and 100k chunks × 1536 (synthetic, in-process),
    /// and ingestion chunks/s through the built-in mock.
    Search,
}

impl Scenario {
    /// Measured phases it runs (for the progress bar).
    fn phases(self) -> u64 {
        match self {
            Scenario::Overhead | Scenario::Throughput | Scenario::Writer => 4,
            Scenario::Logging => 4 * u64::from(latency_zero::LOGGING_ROUNDS),
            Scenario::Sweep => 2 * latency_zero::SWEEP_CLIENTS.len() as u64,
            Scenario::SlowAi | Scenario::Streams => 2,
            Scenario::SaturatedHealth | Scenario::Overload => 1,
            Scenario::Cluster => 0,
            Scenario::Search => search::PHASES,
        }
    }

    /// Measured phases it adds on PostgreSQL when `--db` names a server.
    fn postgres_phases(self) -> u64 {
        match self {
            Scenario::Writer => store::POSTGRES_PHASES,
            Scenario::Logging => 4 * u64::from(latency_zero::LOGGING_ROUNDS),
            Scenario::SlowAi => 1,
            Scenario::Cluster => cluster::PHASES,
            _ => 0,
        }
    }
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Scenarios to run, comma-separated [default: all].
    #[arg(long, value_delimiter = ',', value_name = "A,B,…")]
    scenarios: Vec<Scenario>,
    /// Length of each measured phase, in seconds.
    #[arg(long, value_name = "S", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration_s: u64,
    /// Concurrent callers in slow-ai.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=8000))]
    clients: u64,
    /// Concurrent streams in streams.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=8000))]
    streams: u64,
    /// Gateways on the one PostgreSQL database in cluster.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=16))]
    instances: u64,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw latency and throughput against concurrency as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// A PostgreSQL server (postgres://…) to measure beside SQLite: the writer on its own, the
    /// gateway in logging and slow-ai, and the gateways of cluster, each in a scratch database
    /// the bench makes there and drops (the role needs CREATEDB).
    #[arg(long, value_name = "URL", value_parser = crate::database::Database::parse)]
    db: Option<crate::database::Database>,
}

/// Set by SIGINT/SIGTERM: every wait of the bench checks it and unwinds, so the guards stop
/// the processes and threads the bench started.
static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// What every scenario uses: the processes, the progress bar, the settings.
pub(crate) struct Bench {
    fleet: Fleet,
    bar: ProgressBar,
    duration: Duration,
    clients: usize,
    streams: usize,
    /// Gateways on PostgreSQL in the cluster scenario.
    instances: usize,
    /// Latency-0 runs at each concurrency, for the SVG.
    points: Vec<svg::Point>,
    /// The PostgreSQL server `--db` names, measured beside SQLite (the gateways on it are the
    /// fleet's to start).
    postgres: Option<crate::database::Postgres>,
}

pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal ends the bench at once (its children die with it: see procs.rs).
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&INTERRUPTED))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&INTERRUPTED)))
            .context("cannot install signal handlers")?;
    }

    if cfg!(debug_assertions) {
        eprintln!(
            "syncgate bench: WARNING: this is a DEBUG build: every figure will be far worse \
             than a release build's. Use `cargo run --release -- bench`."
        );
    }
    let mut selected = if args.scenarios.is_empty() {
        Scenario::value_variants().to_vec()
    } else {
        args.scenarios.clone()
    };
    selected.sort();
    selected.dedup();

    let clients = args.clients as usize;
    let streams = args.streams as usize;
    // Two descriptors per client connection here (the connection and the clone kept to hang
    // up on it), the same again on the gateway's side when it is in this process's limits.
    let needed = 2 * (clients.max(streams).max(256) as u64) + 256;
    if let Err(why) = crate::server::raise_open_files_limit(needed) {
        eprintln!("syncgate bench: {why}; the largest scenarios may fail to connect");
    }

    let exe = std::env::current_exe().context("cannot find this executable")?;
    let pg = match &args.db {
        None => None,
        Some(crate::database::Database::Postgres(pg)) => Some(pg.clone()),
        Some(crate::database::Database::Sqlite(_)) => {
            anyhow::bail!("--db names a PostgreSQL server to measure; SQLite is always measured")
        }
    };
    // Read before any load: the load average says how busy the machine already was.
    let mut machine = report::machine();
    if let Some(server) = &pg {
        // Asked now, so a server the bench cannot reach fails the run before it starts.
        machine.postgres = Some(postgres::describe(server)?);
    }
    let total_phases = selected
        .iter()
        .map(|s| s.phases() + if pg.is_some() { s.postgres_phases() } else { 0 })
        .sum::<u64>();
    let bar =
        ProgressBar::with_draw_target(Some(total_phases), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:24} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut bench = Bench {
        fleet: Fleet::new(exe, pg.clone())?,
        bar,
        duration: Duration::from_secs(args.duration_s),
        clients,
        streams,
        instances: args.instances as usize,
        points: Vec::new(),
        postgres: pg,
    };

    let started = Instant::now();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for scenario in selected {
        let outcome = match scenario {
            Scenario::Overhead => latency_zero::overhead(&mut bench),
            Scenario::Throughput => latency_zero::throughput(&mut bench),
            Scenario::Sweep => latency_zero::sweep(&mut bench),
            Scenario::SlowAi => scenarios::slow_ai(&mut bench),
            Scenario::SaturatedHealth => scenarios::saturated_health(&mut bench),
            Scenario::Overload => scenarios::overload(&mut bench),
            Scenario::Streams => streams::streams(&mut bench),
            Scenario::Logging => latency_zero::logging(&mut bench),
            Scenario::Writer => store::writer(&mut bench),
            Scenario::Cluster => cluster::cluster(&mut bench),
            Scenario::Search => search::search(&mut bench),
        };
        let outcome = outcome.with_context(|| format!("scenario {scenario:?} failed"))?;
        outcomes.push(outcome);
    }
    bench.bar.finish_and_clear();
    drop(bench.fleet);

    let json = report::json(&machine, &outcomes);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&json).context("cannot render the JSON")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let text = svg::render(&bench.points, &machine);
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!(
        "{}",
        report::table(&machine, &outcomes, started.elapsed(), bench.duration)
    );
    Ok(ExitCode::SUCCESS)
}

impl Bench {
    /// A CPU meter over the processes of a run: the gateway when there is one (the direct
    /// runs have none), the mock upstream, and this load generator.
    fn cpu_meter(&self, gateway: Option<u32>) -> observe::CpuMeter {
        let mut procs = vec![
            ("upstream", self.fleet.upstream_pid()),
            ("load_generator", None),
        ];
        if let Some(pid) = gateway {
            procs.insert(0, ("gateway", Some(pid)));
        }
        observe::CpuMeter::new(procs)
    }

    /// Says what runs now (on the bar, or as a line when stderr is not a terminal).
    fn phase(&self, text: String) {
        if self.bar.is_hidden() {
            eprintln!("syncgate bench: {text}");
        }
        self.bar.set_message(text);
    }

    /// The gateway with `spec` in front of `upstream`, idle (nothing left busy or queued from
    /// an earlier phase). Returns its address and pid.
    fn gateway(
        &mut self,
        upstream: MockSpec,
        spec: GatewaySpec,
    ) -> anyhow::Result<(std::net::SocketAddr, u32)> {
        let proc = self.fleet.gateway(upstream, spec)?;
        let (addr, pid) = (proc.addr, proc.pid());
        let (gauges, idle) = observe::wait_for_gauges(addr, Duration::from_secs(15), |g| {
            g.workers_busy == 0 && g.queue_depth == 0
        })?;
        if !idle {
            self.phase(format!(
                "gateway still busy from the last phase ({gauges:?}); going on"
            ));
        }
        Ok((addr, pid))
    }

    /// Runs one closed-loop phase: warm up, then measure for `duration` (longer, up to twice
    /// that, until `min_samples` answers arrived), calling `tick(measuring)` about every 100 ms.
    fn measure(
        &mut self,
        label: String,
        spec: &LoadSpec,
        warmup: Duration,
        duration: Duration,
        min_samples: u64,
        mut tick: impl FnMut(bool),
    ) -> anyhow::Result<LoadResult> {
        self.phase(label);
        let mut load = Load::start(spec)?;
        wait(warmup, || tick(false))?;
        load.begin_measuring();
        wait(duration, || tick(true))?;
        let cap = Instant::now() + duration;
        while load.samples() < min_samples && Instant::now() < cap {
            wait(Duration::from_millis(100), || tick(true))?;
        }
        let result = load.finish();
        self.bar.inc(1);
        Ok(result)
    }
}

/// Sleeps `d`, calling `tick` about every 100 ms; fails at once when the bench is interrupted.
fn wait(d: Duration, mut tick: impl FnMut()) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        tick();
        if interrupted() {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}
