//! Configuration: defaults → TOML file → `SYNCGATE_*` environment → flags, validated once.
//!
//! Two stages: [`RawConfig`] is what serde reads from the file (unknown keys are an error);
//! [`Config::resolve`] lays the environment and flags over it and returns a [`Config`] with
//! every value checked and no `Option` left for the rest of the program to guess about.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::database::Database;

/// Values given on the command line or in the environment (clap reads both: a flag wins over
/// its `SYNCGATE_*` variable). `None` means "not given here": the file or the default decides.
#[derive(Debug, Default, Clone)]
pub(crate) struct Overrides {
    pub(crate) listen: Option<String>,
    pub(crate) db: Option<String>,
    pub(crate) workers: Option<usize>,
    pub(crate) queue: Option<usize>,
    pub(crate) max_queue_wait_ms: Option<u64>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) max_body_bytes: Option<u64>,
    pub(crate) header_timeout_ms: Option<u64>,
    pub(crate) body_timeout_ms: Option<u64>,
    pub(crate) keepalive_timeout_ms: Option<u64>,
    pub(crate) write_timeout_ms: Option<u64>,
    pub(crate) shutdown_grace_ms: Option<u64>,
    pub(crate) mock_latency_ms: Option<u64>,
    pub(crate) debug_routes: bool,
    pub(crate) allow_open: bool,
}

/// The TOML file as written. Every table denies unknown keys, so a typo stops start-up.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    db: Option<String>,
    #[serde(default)]
    capacity: RawCapacity,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    mock: RawMock,
    #[serde(default)]
    stream: RawStream,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    conversations: RawConversations,
    #[serde(default)]
    jobs: RawJobs,
    #[serde(default)]
    batch: RawBatch,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    files: RawFiles,
    #[serde(default)]
    knowledge: RawKnowledge,
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    prices: Vec<RawPrice>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    workers: Option<usize>,
    queue: Option<usize>,
    max_queue_wait_ms: Option<u64>,
    max_connections: Option<usize>,
    ready_high_water: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    max_body_bytes: Option<u64>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    keepalive_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    shutdown_grace_ms: Option<u64>,
    trusted_proxies: Option<Vec<String>>,
    local_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMock {
    latency_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    heartbeat_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    read_pool: Option<usize>,
    write_queue: Option<usize>,
    log_queue: Option<usize>,
    log_overflow: Option<String>,
    log_block_ms: Option<u64>,
    log_flush_ms: Option<u64>,
    batch_max: Option<usize>,
    durability: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    requests: Option<bool>,
    bodies: Option<bool>,
    body_max_bytes: Option<usize>,
    retention_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobs {
    workers: Option<usize>,
    lease_ms: Option<u64>,
    max_queued: Option<usize>,
    max_attempts: Option<u32>,
    retention_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    on_store_error: Option<String>,
    lease_ms: Option<u64>,
    pool: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    max_bytes: Option<u64>,
    max_uploads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKnowledge {
    embedding_model: Option<String>,
    cache_mb: Option<u64>,
    max_files_per_store: Option<u64>,
    max_chunks_per_store: Option<u64>,
    max_ingesting: Option<usize>,
    embed_batch: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConversations {
    max_history_messages: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_items: Option<usize>,
    parallelism: Option<usize>,
    threads: Option<usize>,
    queue: Option<usize>,
}

/// One `[[providers]]` entry; `type` picks the variant, and each variant has its own keys.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum RawProvider {
    /// Any OpenAI-compatible API (OpenAI, xAI, Groq, Mistral, Ollama, vLLM, …).
    Openai {
        name: String,
        base_url: String,
        api_key_env: Option<String>,
        max_concurrency: Option<usize>,
        proxy: Option<String>,
        #[serde(default)]
        timeouts: RawTimeouts,
    },
    /// In-process and deterministic, with its own latency.
    Mock {
        name: String,
        latency_ms: Option<u64>,
        max_concurrency: Option<usize>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect_ms: Option<u64>,
    first_byte_ms: Option<u64>,
    idle_ms: Option<u64>,
    total_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    targets: Vec<String>,
}

/// `[[prices]]`: what one model target costs, dollars per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    target: String,
    input_per_mtok_usd: f64,
    output_per_mtok_usd: f64,
    cached_input_per_mtok_usd: Option<f64>,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Address to listen on; port 0 picks a free one. Default `127.0.0.1:8080`.
    pub(crate) listen: SocketAddr,
    /// Where everything is remembered: a SQLite file or a PostgreSQL server. Default the file
    /// `./syncgate.db`.
    pub(crate) db: Database,
    pub(crate) capacity: Capacity,
    pub(crate) http: HttpLimits,
    /// Time queued and in-flight work gets to finish after SIGTERM/SIGINT. Default 30 s.
    pub(crate) shutdown_grace: Duration,
    /// Proxies whose `X-Forwarded-For` is believed. Default loopback.
    pub(crate) trusted_proxies: Vec<crate::http::forwarded::Cidr>,
    /// Host names besides `localhost` and loopback addresses that development mode serves
    /// (lower case, no port). Default none.
    pub(crate) local_hosts: Vec<String>,
    /// Time the built-in `mock` model takes to answer. Default 0.
    pub(crate) mock_latency: Duration,
    /// Serve `POST /debug/panic` (tests only; hidden flag). Default off.
    pub(crate) debug_routes: bool,
    /// Serve requests without keys on a non-loopback address while no API key exists
    /// (`--allow-open`). Default off: such a server refuses to start.
    pub(crate) allow_open: bool,
    /// Gap after which a waiting stream gets an SSE comment (`: keep-alive`). Default 10 s.
    pub(crate) heartbeat: Duration,
    pub(crate) store: StoreConfig,
    pub(crate) log: LogConfig,
    pub(crate) jobs: JobsConfig,
    pub(crate) limits: LimitsConfig,
    /// Stored messages sent to the model with a new conversation turn, at most (the newest;
    /// the conversation's system prompt is always sent). Default 50.
    pub(crate) max_history_messages: usize,
    pub(crate) batch: BatchConfig,
    pub(crate) files: FilesConfig,
    pub(crate) knowledge: KnowledgeConfig,
    /// Configured providers (the built-in `mock` is not listed here; it always exists).
    pub(crate) providers: Vec<ProviderConfig>,
    /// Configured model names and their targets, tried in order.
    pub(crate) models: Vec<ModelConfig>,
    /// What each priced target costs (`[[prices]]`); a target without one is unpriced.
    pub(crate) prices: crate::spend::Prices,
}

/// The name of the built-in provider and of its model; reserved.
pub(crate) const BUILTIN_MOCK: &str = "mock";

#[derive(Debug, Clone)]
pub(crate) struct ProviderConfig {
    pub(crate) name: String,
    /// Calls in flight to this provider at most; over it → next target, else 503. Default 64.
    pub(crate) max_concurrency: usize,
    pub(crate) kind: ProviderKind,
}

#[derive(Debug, Clone)]
pub(crate) enum ProviderKind {
    OpenAi {
        /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
        base_url: String,
        /// The environment variable holding the API key (never the key itself).
        api_key_env: Option<String>,
        /// An HTTP proxy for this provider; none unless configured (never from the environment).
        proxy: Option<String>,
        timeouts: Timeouts,
    },
    Mock {
        latency: Duration,
    },
}

/// Deadlines of a provider call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// TCP (and TLS) connection set-up. Default 5 s.
    pub(crate) connect: Duration,
    /// Until the response head, and for a stream until its first event. Default 60 s.
    pub(crate) first_byte: Duration,
    /// Longest gap between streamed chunks. Default 30 s.
    pub(crate) idle: Duration,
    /// The whole call to this provider, retries included. Default 600 s.
    pub(crate) total: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct ModelConfig {
    pub(crate) name: String,
    pub(crate) targets: Vec<Target>,
}

/// `provider/upstream-model`: which provider to call and the model name it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) provider: String,
    pub(crate) upstream_model: String,
}

/// How much work the server takes on at once, and how long work may wait.
#[derive(Debug, Clone)]
pub(crate) struct Capacity {
    /// Worker threads; also the most requests (and streams) served at once. Default 256.
    pub(crate) workers: usize,
    /// Queue slots in front of the workers; over it → 503 `queue_full`. Default 128.
    pub(crate) queue: usize,
    /// A queued request older than this is refused (503 `queue_timeout`). Default 5000 ms.
    pub(crate) max_queue_wait: Duration,
    /// Open connections at most; over it → 503 and close. Default 1024.
    pub(crate) max_connections: usize,
    /// `/readyz` answers 503 while the queue holds at least this share of its slots. Default 0.8.
    pub(crate) ready_high_water: f64,
}

/// The store: its connection pool and its writer.
#[derive(Debug, Clone)]
pub(crate) struct StoreConfig {
    /// Pooled connections at most: SQLite's reads, or PostgreSQL's reads and acknowledged
    /// writes. Default 8.
    pub(crate) read_pool: usize,
    /// Acknowledged writes (conversation turns) waiting for the writer, at most. Default 1024.
    pub(crate) write_queue: usize,
    /// Request-log rows waiting for the writer, at most. Default 10,000.
    pub(crate) log_queue: usize,
    /// What a request does when the log queue is full.
    pub(crate) log_overflow: LogOverflow,
    /// How often the writer commits the request log while log rows are arriving. Default 10 ms.
    pub(crate) log_flush: Duration,
    /// Rows in one transaction at most. Default 1000.
    pub(crate) batch_max: usize,
    /// `synchronous` for acknowledged writes (the log always uses NORMAL). Default full.
    pub(crate) durability: Durability,
}

/// The request log's policy when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogOverflow {
    /// Wait for room up to this long, then drop the row (counted).
    Block(Duration),
    /// Drop the row at once (counted).
    Drop,
}

/// How hard an acknowledged write is made to stick before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// `synchronous = FULL`: the WAL is synced at each commit; survives power loss.
    Full,
    /// `synchronous = NORMAL`: survives a crash of syncgate, not of the machine.
    Normal,
}

/// The durable job runner: its own threads, never the request workers.
#[derive(Debug, Clone)]
pub(crate) struct JobsConfig {
    /// Job runner threads: jobs run at once at most. Default 16.
    pub(crate) workers: usize,
    /// A running job's lease: renewed while it runs; past it, another runner may take it.
    /// Default 30 s.
    pub(crate) lease: Duration,
    /// Queued and running jobs at most; a submission past it gets 503. Default 10,000.
    pub(crate) max_queued: usize,
    /// Runs of one job at most (crashes and lost leases count); then it fails. Default 3.
    pub(crate) max_attempts: u32,
    /// Finished jobs (succeeded, failed, cancelled) are deleted in the background this many
    /// days after they finished; 0 keeps them. Default 7.
    pub(crate) retention_days: u64,
}

/// Where files are uploaded.
pub(crate) const UPLOAD_PATH: &str = "/v1/files";
/// What an upload's body may carry besides the file: its other parts (`purpose`, expiry) and
/// every part's headers and boundaries.
pub(crate) const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// Uploads through `POST /v1/files`.
#[derive(Debug, Clone)]
pub(crate) struct FilesConfig {
    /// Largest file; an upload declaring more is answered 413 from its head, unread. Its own
    /// cap, beside `[http] max_body_bytes`. Default 32 MiB.
    pub(crate) max_bytes: u64,
    /// Uploads read at once at most: each is held in memory whole while it is read and
    /// stored; one more is answered 503 with `Retry-After`. Default 4.
    pub(crate) max_uploads: usize,
}

/// The knowledge base: vector stores, their ingestion and their search.
#[derive(Debug, Clone)]
pub(crate) struct KnowledgeConfig {
    /// The model a new vector store embeds with, unless its `metadata.embedding_model` names
    /// another; pinned at creation. Default none: then the built-in `mock` when it is the
    /// only way to embed (development), else a store needs one named.
    pub(crate) embedding_model: Option<String>,
    /// Memory for vector stores' vectors loaded for search (least recently used go first).
    /// Default 256 MiB.
    pub(crate) cache_bytes: u64,
    /// Files attached to one store at most. Default 10,000 (OpenAI's limit).
    pub(crate) max_files_per_store: u64,
    /// Chunks in one store at most; a file that would pass it fails naming the limit.
    /// Default 100,000 (at 1,536 dimensions, 614 MB of vectors).
    pub(crate) max_chunks_per_store: u64,
    /// Ingestion jobs running at once at most, across the job runner's threads. Default 2.
    pub(crate) max_ingesting: usize,
    /// Chunks embedded per call to the embedding model. Default 64.
    pub(crate) embed_batch: usize,
}

/// Per-key limits shared by several instances on PostgreSQL (SQLite keeps them in memory).
#[derive(Debug, Clone)]
pub(crate) struct LimitsConfig {
    /// What a keyed request gets when the shared limits cannot be checked (the database
    /// cannot be reached, or this instance lost its lease). Default `closed`.
    pub(crate) on_store_error: OnStoreError,
    /// An instance's lease: renewed every fifth of it; an instance silent this long is dead
    /// and its in-flight slots are freed. Default 10 s.
    pub(crate) lease: Duration,
    /// Connections of the limiter's own pool, for admissions and settles (never the read
    /// pool's); a call waits at most 1 s for one. Default 4.
    pub(crate) pool: usize,
}

/// `[limits] on_store_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnStoreError {
    /// Refuse with 503 `store_unavailable` and a Retry-After.
    Closed,
    /// Admit without limits, counted and logged once a minute.
    Open,
}

/// `POST /api/batch` and the pool of threads its calls run on.
#[derive(Debug, Clone)]
pub(crate) struct BatchConfig {
    /// Calls in one batch at most; a larger batch is refused (400). Default 64.
    pub(crate) max_items: usize,
    /// Calls of one batch running or queued in the pool at once, at most. Default 8.
    pub(crate) parallelism: usize,
    /// The pool's threads, shared by every batch: the most batch calls running at once. Default 32.
    pub(crate) threads: usize,
    /// Calls waiting for a pool thread, at most; a call that cannot get in within
    /// `capacity.max_queue_wait` is answered 503 `batch_pool_full`. Default 256.
    pub(crate) queue: usize,
}

/// The request log.
#[derive(Debug, Clone)]
pub(crate) struct LogConfig {
    /// Write a row per `/v1` and `/api` call. Default on.
    pub(crate) requests: bool,
    /// Keep request and response bodies in the row. Default off.
    pub(crate) bodies: bool,
    /// Each kept body is cut to this many bytes. Default 64 KiB.
    pub(crate) body_max_bytes: usize,
    /// Rows older than this many days are deleted in the background; 0 keeps them. Default 30.
    pub(crate) retention_days: u64,
}

/// Per-connection limits and deadlines of the HTTP front end.
#[derive(Debug, Clone)]
pub(crate) struct HttpLimits {
    /// Largest request body; over it → 413 without reading it. Default 4 MiB.
    pub(crate) max_body_bytes: u64,
    /// File uploads (`POST /v1/files`): their own size cap and how many are held at once,
    /// from `[files]`. `None` where nothing is uploaded (the mock upstream).
    pub(crate) uploads: Option<crate::http::Uploads>,
    /// A whole request head must arrive within this, the first timed from accept and a later
    /// one from its first byte; else 408. Default 10 s.
    pub(crate) header_timeout: Duration,
    /// Longest silence while reading a body; else 408. Default 10 s.
    pub(crate) body_timeout: Duration,
    /// An idle keep-alive connection is closed after this. Default 75 s.
    pub(crate) keepalive_timeout: Duration,
    /// Longest a single socket write may block. Default 10 s.
    pub(crate) write_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            db: Database::Sqlite(PathBuf::from("./syncgate.db")),
            capacity: Capacity {
                workers: 256,
                queue: 128,
                max_queue_wait: Duration::from_millis(5000),
                max_connections: 1024,
                ready_high_water: 0.8,
            },
            http: HttpLimits {
                max_body_bytes: 4 * 1024 * 1024,
                uploads: None,
                header_timeout: Duration::from_millis(10_000),
                body_timeout: Duration::from_millis(10_000),
                keepalive_timeout: Duration::from_millis(75_000),
                write_timeout: Duration::from_millis(10_000),
            },
            shutdown_grace: Duration::from_millis(30_000),
            trusted_proxies: crate::http::forwarded::loopback(),
            local_hosts: Vec::new(),
            mock_latency: Duration::ZERO,
            debug_routes: false,
            allow_open: false,
            heartbeat: Duration::from_millis(10_000),
            store: StoreConfig {
                read_pool: 8,
                write_queue: 1024,
                log_queue: 10_000,
                log_overflow: LogOverflow::Block(Duration::from_millis(100)),
                log_flush: Duration::from_millis(10),
                batch_max: 1000,
                durability: Durability::Full,
            },
            log: LogConfig {
                requests: true,
                bodies: false,
                body_max_bytes: 64 * 1024,
                retention_days: 30,
            },
            max_history_messages: 50,
            jobs: JobsConfig {
                workers: 16,
                lease: Duration::from_millis(30_000),
                max_queued: 10_000,
                max_attempts: 3,
                retention_days: 7,
            },
            limits: LimitsConfig {
                on_store_error: OnStoreError::Closed,
                lease: Duration::from_millis(10_000),
                pool: 4,
            },
            batch: BatchConfig {
                max_items: 64,
                parallelism: 8,
                threads: 32,
                queue: 256,
            },
            files: FilesConfig {
                max_bytes: 32 * 1024 * 1024,
                max_uploads: 4,
            },
            knowledge: KnowledgeConfig {
                embedding_model: None,
                cache_bytes: 256 * 1024 * 1024,
                max_files_per_store: 10_000,
                max_chunks_per_store: 100_000,
                max_ingesting: 2,
                embed_batch: 64,
            },
            providers: Vec::new(),
            models: Vec::new(),
            prices: crate::spend::Prices::default(),
        }
    }
}

/// Why a configuration was refused. Each message names the key and, for the file, its path.
#[derive(Debug)]
pub(crate) enum ConfigError {
    /// The file could not be read.
    Read { path: PathBuf, err: std::io::Error },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    Parse { path: PathBuf, err: toml::de::Error },
    /// A value parsed but is out of range; `source` says where it came from.
    Invalid {
        key: &'static str,
        source: String,
        why: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, err } => {
                write!(f, "cannot read config file {}: {err}", path.display())
            }
            ConfigError::Parse { path, err } => {
                write!(
                    f,
                    "invalid config file {}: {}",
                    path.display(),
                    err.to_string().trim_end()
                )
            }
            ConfigError::Invalid { key, source, why } => {
                write!(f, "invalid value for `{key}` ({source}): {why}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where a value came from, for error messages: the flag/environment, or the file.
fn origin(from_flags: bool, file: Option<&Path>) -> String {
    match (from_flags, file) {
        (true, _) => "command line or SYNCGATE_* environment".to_string(),
        (false, Some(path)) => format!("config file {}", path.display()),
        (false, None) => "default".to_string(),
    }
}

impl Config {
    /// Reads the optional file, lays the overrides over it and validates the result.
    pub(crate) fn resolve(file: Option<&Path>, over: &Overrides) -> Result<Config, ConfigError> {
        let raw = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
                    path: path.to_path_buf(),
                    err,
                })?;
                toml::from_str::<RawConfig>(&text).map_err(|err| ConfigError::Parse {
                    path: path.to_path_buf(),
                    err,
                })?
            }
            None => RawConfig::default(),
        };
        Config::validate(raw, file, over)
    }

    fn validate(
        raw: RawConfig,
        file: Option<&Path>,
        over: &Overrides,
    ) -> Result<Config, ConfigError> {
        let d = Config::default();
        // Picks the override, else the file, else the default, and remembers which it was.
        fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> (T, bool) {
            match (flag, file) {
                (Some(v), _) => (v, true),
                (None, Some(v)) => (v, false),
                (None, None) => (default, false),
            }
        }
        let invalid = |key: &'static str, from_flags: bool, why: String| ConfigError::Invalid {
            key,
            source: origin(from_flags, file),
            why,
        };
        let at_least = |key: &'static str, (v, f): (u64, bool), min: u64| {
            if v < min {
                Err(invalid(key, f, format!("must be at least {min}, got {v}")))
            } else {
                Ok(v)
            }
        };
        let millis = |key, pair, min| at_least(key, pair, min).map(Duration::from_millis);

        let (listen_text, listen_flag) =
            pick(over.listen.clone(), raw.listen, d.listen.to_string());
        let listen = resolve_addr(&listen_text)
            .map_err(|why| invalid("listen", listen_flag, format!("{listen_text:?}: {why}")))?;

        let (db_text, db_flag) = pick(over.db.clone(), raw.db, "./syncgate.db".to_string());
        let db = Database::parse(&db_text).map_err(|why| invalid("db", db_flag, why))?;

        let c = raw.capacity;
        let as_u64 = |(v, f): (usize, bool)| (v as u64, f);
        let workers = at_least(
            "capacity.workers",
            as_u64(pick(over.workers, c.workers, d.capacity.workers)),
            1,
        )?;
        let queue = at_least(
            "capacity.queue",
            as_u64(pick(over.queue, c.queue, d.capacity.queue)),
            1,
        )?;
        let max_connections = at_least(
            "capacity.max_connections",
            as_u64(pick(
                over.max_connections,
                c.max_connections,
                d.capacity.max_connections,
            )),
            1,
        )?;
        let max_queue_wait = millis(
            "capacity.max_queue_wait_ms",
            pick(over.max_queue_wait_ms, c.max_queue_wait_ms, 5000),
            1,
        )?;
        let ready_high_water = c.ready_high_water.unwrap_or(d.capacity.ready_high_water);
        if !(ready_high_water > 0.0 && ready_high_water <= 1.0) {
            return Err(invalid(
                "capacity.ready_high_water",
                false,
                format!("must be in (0, 1], got {ready_high_water}"),
            ));
        }

        let h = raw.http;
        let max_body_bytes = at_least(
            "http.max_body_bytes",
            pick(over.max_body_bytes, h.max_body_bytes, d.http.max_body_bytes),
            1,
        )?;
        let mut http = HttpLimits {
            max_body_bytes,
            uploads: None,
            header_timeout: millis(
                "http.header_timeout_ms",
                pick(over.header_timeout_ms, h.header_timeout_ms, 10_000),
                1,
            )?,
            body_timeout: millis(
                "http.body_timeout_ms",
                pick(over.body_timeout_ms, h.body_timeout_ms, 10_000),
                1,
            )?,
            keepalive_timeout: millis(
                "http.keepalive_timeout_ms",
                pick(over.keepalive_timeout_ms, h.keepalive_timeout_ms, 75_000),
                1,
            )?,
            write_timeout: millis(
                "http.write_timeout_ms",
                pick(over.write_timeout_ms, h.write_timeout_ms, 10_000),
                1,
            )?,
        };
        let shutdown_grace = millis(
            "server.shutdown_grace_ms",
            pick(over.shutdown_grace_ms, raw.server.shutdown_grace_ms, 30_000),
            0,
        )?;
        let trusted_proxies = match raw.server.trusted_proxies {
            None => d.trusted_proxies.clone(),
            Some(list) => list
                .iter()
                .map(|text| crate::http::forwarded::Cidr::parse(text))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|why| file_invalid("server.trusted_proxies", file, why))?,
        };
        let local_hosts = match raw.server.local_hosts {
            None => d.local_hosts.clone(),
            Some(names) => names
                .iter()
                .map(|name| {
                    let name = name.trim().to_ascii_lowercase();
                    let plain = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                    if plain {
                        Ok(name)
                    } else {
                        Err(format!(
                            "{name:?} is not a host name (letters, digits, '-' and '.'; no port)"
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|why| file_invalid("server.local_hosts", file, why))?,
        };
        let mock_latency = millis(
            "mock.latency_ms",
            pick(over.mock_latency_ms, raw.mock.latency_ms, 0),
            0,
        )?;

        let heartbeat = millis(
            "stream.heartbeat_ms",
            (raw.stream.heartbeat_ms.unwrap_or(10_000), false),
            1,
        )?;
        let store = validate_store(raw.store, &d.store, file)?;
        let log = LogConfig {
            requests: raw.log.requests.unwrap_or(d.log.requests),
            bodies: raw.log.bodies.unwrap_or(d.log.bodies),
            body_max_bytes: raw.log.body_max_bytes.unwrap_or(d.log.body_max_bytes),
            retention_days: raw.log.retention_days.unwrap_or(d.log.retention_days),
        };
        let j = raw.jobs;
        let jobs = JobsConfig {
            workers: at_least(
                "jobs.workers",
                (j.workers.unwrap_or(d.jobs.workers) as u64, false),
                1,
            )? as usize,
            lease: millis(
                "jobs.lease_ms",
                (j.lease_ms.unwrap_or(d.jobs.lease.as_millis() as u64), false),
                100,
            )?,
            max_queued: at_least(
                "jobs.max_queued",
                (j.max_queued.unwrap_or(d.jobs.max_queued) as u64, false),
                1,
            )? as usize,
            max_attempts: at_least(
                "jobs.max_attempts",
                (
                    u64::from(j.max_attempts.unwrap_or(d.jobs.max_attempts)),
                    false,
                ),
                1,
            )? as u32,
            retention_days: j.retention_days.unwrap_or(d.jobs.retention_days),
        };
        let limits = LimitsConfig {
            on_store_error: match raw.limits.on_store_error.as_deref() {
                None => d.limits.on_store_error,
                Some("closed") => OnStoreError::Closed,
                Some("open") => OnStoreError::Open,
                Some(other) => {
                    return Err(file_invalid(
                        "limits.on_store_error",
                        file,
                        format!("{other:?} is neither \"closed\" nor \"open\""),
                    ))
                }
            },
            lease: millis(
                "limits.lease_ms",
                (
                    raw.limits
                        .lease_ms
                        .unwrap_or(d.limits.lease.as_millis() as u64),
                    false,
                ),
                1000,
            )?,
            pool: at_least(
                "limits.pool",
                (raw.limits.pool.unwrap_or(d.limits.pool as u64), false),
                1,
            )? as usize,
        };
        let max_history_messages = at_least(
            "conversations.max_history_messages",
            (
                raw.conversations
                    .max_history_messages
                    .unwrap_or(d.max_history_messages) as u64,
                false,
            ),
            1,
        )? as usize;
        let b = raw.batch;
        let batch_value = |key, v: Option<usize>, default: usize| {
            at_least(key, (v.unwrap_or(default) as u64, false), 1).map(|n| n as usize)
        };
        let batch = BatchConfig {
            max_items: batch_value("batch.max_items", b.max_items, d.batch.max_items)?,
            parallelism: batch_value("batch.parallelism", b.parallelism, d.batch.parallelism)?,
            threads: batch_value("batch.threads", b.threads, d.batch.threads)?,
            queue: batch_value("batch.queue", b.queue, d.batch.queue)?,
        };
        let f = raw.files;
        let files = FilesConfig {
            max_bytes: at_least(
                "files.max_bytes",
                (f.max_bytes.unwrap_or(d.files.max_bytes), false),
                1,
            )?,
            max_uploads: at_least(
                "files.max_uploads",
                (f.max_uploads.unwrap_or(d.files.max_uploads) as u64, false),
                1,
            )? as usize,
        };
        http.uploads = Some(crate::http::Uploads::new(
            UPLOAD_PATH,
            files.max_bytes + MULTIPART_OVERHEAD,
            files.max_uploads,
        ));
        let k = raw.knowledge;
        let count =
            |key, v: Option<u64>, default: u64| at_least(key, (v.unwrap_or(default), false), 1);
        let knowledge = KnowledgeConfig {
            embedding_model: k.embedding_model.filter(|m| !m.is_empty()),
            cache_bytes: k
                .cache_mb
                .map_or(d.knowledge.cache_bytes, |mb| mb * 1024 * 1024),
            max_files_per_store: count(
                "knowledge.max_files_per_store",
                k.max_files_per_store,
                d.knowledge.max_files_per_store,
            )?,
            max_chunks_per_store: count(
                "knowledge.max_chunks_per_store",
                k.max_chunks_per_store,
                d.knowledge.max_chunks_per_store,
            )?,
            max_ingesting: count(
                "knowledge.max_ingesting",
                k.max_ingesting.map(|n| n as u64),
                d.knowledge.max_ingesting as u64,
            )? as usize,
            embed_batch: count(
                "knowledge.embed_batch",
                k.embed_batch.map(|n| n as u64),
                d.knowledge.embed_batch as u64,
            )? as usize,
        };
        let providers = raw
            .providers
            .into_iter()
            .map(|p| validate_provider(p, file))
            .collect::<Result<Vec<_>, _>>()?;
        let models = validate_models(raw.models, &providers, file)?;
        let prices = validate_prices(raw.prices, &models, file)?;

        Ok(Config {
            listen,
            db,
            capacity: Capacity {
                workers: workers as usize,
                queue: queue as usize,
                max_queue_wait,
                max_connections: max_connections as usize,
                ready_high_water,
            },
            http,
            shutdown_grace,
            trusted_proxies,
            local_hosts,
            mock_latency,
            debug_routes: over.debug_routes,
            allow_open: over.allow_open,
            heartbeat,
            store,
            log,
            jobs,
            limits,
            max_history_messages,
            batch,
            files,
            knowledge,
            providers,
            models,
            prices,
        })
    }
}

fn validate_store(
    raw: RawStore,
    d: &StoreConfig,
    file: Option<&Path>,
) -> Result<StoreConfig, ConfigError> {
    let positive = |key: &'static str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(file_invalid(
            key,
            file,
            "must be at least 1, got 0".to_string(),
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let log_block = Duration::from_millis(raw.log_block_ms.unwrap_or(100));
    let log_overflow = match raw.log_overflow.as_deref() {
        None | Some("block") => LogOverflow::Block(log_block),
        Some("drop") => LogOverflow::Drop,
        Some(other) => {
            return Err(file_invalid(
                "store.log_overflow",
                file,
                format!("must be \"block\" or \"drop\", got {other:?}"),
            ))
        }
    };
    let durability = match raw.durability.as_deref() {
        None | Some("full") => Durability::Full,
        Some("normal") => Durability::Normal,
        Some(other) => {
            return Err(file_invalid(
                "store.durability",
                file,
                format!("must be \"full\" or \"normal\", got {other:?}"),
            ))
        }
    };
    let log_flush = match raw.log_flush_ms {
        Some(0) => {
            return Err(file_invalid(
                "store.log_flush_ms",
                file,
                "must be at least 1, got 0".to_string(),
            ))
        }
        Some(ms) => Duration::from_millis(ms),
        None => d.log_flush,
    };
    Ok(StoreConfig {
        read_pool: positive("store.read_pool", raw.read_pool, d.read_pool)?,
        write_queue: positive("store.write_queue", raw.write_queue, d.write_queue)?,
        log_queue: positive("store.log_queue", raw.log_queue, d.log_queue)?,
        log_overflow,
        log_flush,
        batch_max: positive("store.batch_max", raw.batch_max, d.batch_max)?,
        durability,
    })
}

fn file_invalid(key: &'static str, file: Option<&Path>, why: String) -> ConfigError {
    ConfigError::Invalid {
        key,
        source: origin(false, file),
        why,
    }
}

fn validate_provider(raw: RawProvider, file: Option<&Path>) -> Result<ProviderConfig, ConfigError> {
    let check_name = |name: &str| {
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
            Err(file_invalid(
                "providers.name",
                file,
                format!("{name:?} must be non-empty, without '/' or spaces"),
            ))
        } else if name == BUILTIN_MOCK {
            Err(file_invalid(
                "providers.name",
                file,
                format!("{name:?} is reserved for the built-in mock provider"),
            ))
        } else {
            Ok(())
        }
    };
    let concurrency = |name: &str, v: Option<usize>| match v.unwrap_or(64) {
        0 => Err(file_invalid(
            "providers.max_concurrency",
            file,
            format!("provider {name:?}: must be at least 1"),
        )),
        n => Ok(n),
    };
    match raw {
        RawProvider::Openai {
            name,
            base_url,
            api_key_env,
            max_concurrency,
            proxy,
            timeouts,
        } => {
            check_name(&name)?;
            let max_concurrency = concurrency(&name, max_concurrency)?;
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(file_invalid(
                    "providers.base_url",
                    file,
                    format!("provider {name:?}: {base_url:?} must start with http:// or https://"),
                ));
            }
            let ms = |key: &'static str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
                0 => Err(file_invalid(
                    key,
                    file,
                    format!("provider {name:?}: must be at least 1"),
                )),
                n => Ok(Duration::from_millis(n)),
            };
            let timeouts = Timeouts {
                connect: ms("providers.timeouts.connect_ms", timeouts.connect_ms, 5_000)?,
                first_byte: ms(
                    "providers.timeouts.first_byte_ms",
                    timeouts.first_byte_ms,
                    60_000,
                )?,
                idle: ms("providers.timeouts.idle_ms", timeouts.idle_ms, 30_000)?,
                total: ms("providers.timeouts.total_ms", timeouts.total_ms, 600_000)?,
            };
            Ok(ProviderConfig {
                kind: ProviderKind::OpenAi {
                    base_url: base_url.trim_end_matches('/').to_string(),
                    api_key_env: api_key_env.filter(|v| !v.is_empty()),
                    proxy,
                    timeouts,
                },
                name,
                max_concurrency,
            })
        }
        RawProvider::Mock {
            name,
            latency_ms,
            max_concurrency,
        } => {
            check_name(&name)?;
            Ok(ProviderConfig {
                max_concurrency: concurrency(&name, max_concurrency)?,
                kind: ProviderKind::Mock {
                    latency: Duration::from_millis(latency_ms.unwrap_or(0)),
                },
                name,
            })
        }
    }
}

fn validate_models(
    raw: Vec<RawModel>,
    providers: &[ProviderConfig],
    file: Option<&Path>,
) -> Result<Vec<ModelConfig>, ConfigError> {
    for (i, p) in providers.iter().enumerate() {
        if providers[..i].iter().any(|q| q.name == p.name) {
            return Err(file_invalid(
                "providers.name",
                file,
                format!("provider {:?} is defined twice", p.name),
            ));
        }
    }
    let mut models: Vec<ModelConfig> = Vec::new();
    for m in raw {
        if m.name.is_empty() || m.name == BUILTIN_MOCK || models.iter().any(|o| o.name == m.name) {
            return Err(file_invalid(
                "models.name",
                file,
                format!("{:?} is empty, reserved, or defined twice", m.name),
            ));
        }
        if m.targets.is_empty() {
            return Err(file_invalid(
                "models.targets",
                file,
                format!("model {:?} needs at least one target", m.name),
            ));
        }
        let mut targets = Vec::new();
        for t in &m.targets {
            let Some((provider, upstream_model)) = t.split_once('/') else {
                return Err(file_invalid(
                    "models.targets",
                    file,
                    format!(
                        "model {:?}: target {t:?} is not `provider/upstream-model`",
                        m.name
                    ),
                ));
            };
            let known = provider == BUILTIN_MOCK || providers.iter().any(|p| p.name == provider);
            if !known || upstream_model.is_empty() {
                return Err(file_invalid(
                    "models.targets",
                    file,
                    format!(
                        "model {:?}: target {t:?} names no configured provider",
                        m.name
                    ),
                ));
            }
            targets.push(Target {
                provider: provider.to_string(),
                upstream_model: upstream_model.to_string(),
            });
        }
        models.push(ModelConfig {
            name: m.name,
            targets,
        });
    }
    Ok(models)
}

/// `[[prices]]`: each target `provider/upstream-model` priced once, in range. A price for a
/// target no model routes to is kept (a shared prices file lists more than one config uses)
/// and said once at start, since it may be a typo.
fn validate_prices(
    raw: Vec<RawPrice>,
    models: &[ModelConfig],
    file: Option<&Path>,
) -> Result<crate::spend::Prices, ConfigError> {
    let mut prices = crate::spend::Prices::default();
    for p in raw {
        let well_formed = p
            .target
            .split_once('/')
            .is_some_and(|(provider, model)| !provider.is_empty() && !model.is_empty());
        if !well_formed {
            return Err(file_invalid(
                "prices.target",
                file,
                format!("{:?} is not `provider/upstream-model`", p.target),
            ));
        }
        if p.target.split('/').next() == Some(BUILTIN_MOCK) {
            return Err(file_invalid(
                "prices.target",
                file,
                format!(
                    "{:?}: the built-in mock is never priced (its calls are unpriced)",
                    p.target
                ),
            ));
        }
        let price = crate::spend::Price::from_usd(
            p.input_per_mtok_usd,
            p.cached_input_per_mtok_usd,
            p.output_per_mtok_usd,
        )
        .map_err(|why| file_invalid("prices", file, format!("{}: {why}", p.target)))?;
        if !prices.insert(&p.target, price) {
            return Err(file_invalid(
                "prices.target",
                file,
                format!("{:?} is priced twice", p.target),
            ));
        }
        let routed = models
            .iter()
            .flat_map(|m| &m.targets)
            .any(|t| format!("{}/{}", t.provider, t.upstream_model) == p.target);
        if !routed {
            log::warn!(
                "[[prices]] target {:?} is not a target of any configured model; its price is unused",
                p.target
            );
        }
    }
    Ok(prices)
}

/// Resolves `host:port` (a literal address or a name such as `localhost:8080`).
fn resolve_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut addrs = text.to_socket_addrs().map_err(|e| e.to_string())?;
    addrs
        .next()
        .ok_or_else(|| "resolves to no address".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str, over: &Overrides) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(toml_text).map_err(|err| ConfigError::Parse {
            path: PathBuf::from("test.toml"),
            err,
        })?;
        Config::validate(raw, Some(Path::new("test.toml")), over)
    }

    #[test]
    fn the_shipped_prices_parse_and_a_price_is_kept_in_micro_dollars() {
        let c = parse(
            include_str!("../deploy/prices.example.toml"),
            &Overrides::default(),
        )
        .unwrap();
        let mini = c.prices.of("openai", "gpt-4o-mini").unwrap();
        assert_eq!(
            (mini.input, mini.cached_input, mini.output),
            (150_000, Some(75_000), 600_000)
        );
        // A model name holding a slash: the provider is what comes before the first.
        assert!(c.prices.of("groq", "openai/gpt-oss-120b").is_some());
        assert!(c.prices.of("openai", "gpt-5-unlisted").is_none());
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::resolve(None, &Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.capacity.workers, 256);
        assert_eq!(c.capacity.queue, 128);
        assert_eq!(c.capacity.max_connections, 1024);
        assert_eq!(c.http.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(c.http.keepalive_timeout, Duration::from_secs(75));
    }

    #[test]
    fn local_hosts_are_plain_names_kept_in_lower_case() {
        let c = parse("", &Overrides::default()).unwrap();
        assert!(c.local_hosts.is_empty());
        let c = parse(
            "[server]\nlocal_hosts = [\"MyApp.test\", \"dev-box\"]\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.local_hosts, ["myapp.test", "dev-box"]);
        for bad in ["\"myapp.test:8080\"", "\"\"", "\"a/b\""] {
            let e = parse(
                &format!("[server]\nlocal_hosts = [{bad}]\n"),
                &Overrides::default(),
            )
            .expect_err(bad);
            assert!(e.to_string().contains("server.local_hosts"), "{e}");
        }
    }

    #[test]
    fn limits_default_to_closed_with_a_10_s_lease_and_a_bad_policy_is_named() {
        let c = parse("", &Overrides::default()).unwrap();
        assert_eq!(c.limits.on_store_error, OnStoreError::Closed);
        assert_eq!(c.limits.lease, Duration::from_secs(10));
        assert_eq!(c.limits.pool, 4);
        let c = parse(
            "[limits]\non_store_error = \"open\"\nlease_ms = 3000\npool = 2\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.limits.on_store_error, OnStoreError::Open);
        assert_eq!(c.limits.lease, Duration::from_secs(3));
        assert_eq!(c.limits.pool, 2);
        let err = parse("[limits]\npool = 0\n", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.pool"), "{err}");
        let err = parse(
            "[limits]\non_store_error = \"ajar\"\n",
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("limits.on_store_error") && err.contains("ajar"),
            "{err}"
        );
        let err = parse("[limits]\nlease_ms = 10\n", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.lease_ms"), "{err}");
    }

    #[test]
    fn files_and_knowledge_have_explicit_defaults_and_a_zero_is_named() {
        let c = parse("", &Overrides::default()).unwrap();
        assert_eq!((c.files.max_bytes, c.files.max_uploads), (32 << 20, 4));
        assert_eq!(c.knowledge.embedding_model, None);
        assert_eq!(c.knowledge.cache_bytes, 256 << 20);
        assert_eq!(
            (
                c.knowledge.max_files_per_store,
                c.knowledge.max_chunks_per_store
            ),
            (10_000, 100_000)
        );
        let c = parse(
            "[files]\nmax_bytes = 1024\nmax_uploads = 2\n\
             [knowledge]\nembedding_model = \"emb\"\ncache_mb = 8\nmax_chunks_per_store = 50\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!((c.files.max_bytes, c.files.max_uploads), (1024, 2));
        assert_eq!(c.knowledge.embedding_model.as_deref(), Some("emb"));
        assert_eq!(c.knowledge.cache_bytes, 8 << 20);
        assert_eq!(c.knowledge.max_chunks_per_store, 50);
        for (toml, key) in [
            ("[files]\nmax_bytes = 0\n", "files.max_bytes"),
            (
                "[knowledge]\nmax_ingesting = 0\n",
                "knowledge.max_ingesting",
            ),
            ("[knowledge]\nembed_batch = 0\n", "knowledge.embed_batch"),
        ] {
            let err = parse(toml, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file = "[capacity]\nworkers = 3\nqueue = 9\n";
        let c = parse(file, &Overrides::default()).unwrap();
        assert_eq!((c.capacity.workers, c.capacity.queue), (3, 9));
        let over = Overrides {
            workers: Some(7),
            ..Overrides::default()
        };
        let c = parse(file, &over).unwrap();
        assert_eq!((c.capacity.workers, c.capacity.queue), (7, 9));
    }

    #[test]
    fn finished_jobs_are_kept_seven_days_unless_the_file_says_otherwise() {
        let c = parse("", &Overrides::default()).unwrap();
        assert_eq!(c.jobs.retention_days, 7);
        let c = parse("[jobs]\nretention_days = 0\n", &Overrides::default()).unwrap();
        assert_eq!(c.jobs.retention_days, 0, "0 keeps finished jobs");
        let c = parse("[jobs]\nretention_days = 90\n", &Overrides::default()).unwrap();
        assert_eq!((c.jobs.retention_days, c.log.retention_days), (90, 30));
    }

    #[test]
    fn unknown_key_is_refused_with_its_name_and_file() {
        let err = parse("[capacity]\nworkerz = 3\n", &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("workerz") && msg.contains("test.toml"),
            "{msg}"
        );
    }

    #[test]
    fn zero_workers_is_refused_naming_the_key_and_file() {
        let msg = parse("[capacity]\nworkers = 0\n", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("capacity.workers") && msg.contains("test.toml"),
            "{msg}"
        );
        let over = Overrides {
            workers: Some(0),
            ..Overrides::default()
        };
        let msg = parse("", &over).unwrap_err().to_string();
        assert!(
            msg.contains("capacity.workers") && msg.contains("command line"),
            "{msg}"
        );
    }

    #[test]
    fn high_water_must_be_a_share() {
        for bad in ["0.0", "1.5", "-0.2"] {
            let text = format!("[capacity]\nready_high_water = {bad}\n");
            assert!(
                parse(&text, &Overrides::default()).is_err(),
                "{bad} accepted"
            );
        }
        assert!(parse(
            "[capacity]\nready_high_water = 1.0\n",
            &Overrides::default()
        )
        .is_ok());
    }

    #[test]
    fn providers_and_models_are_validated() {
        let text = r#"
[[providers]]
name = "openai"
type = "openai"
base_url = "https://api.openai.com/v1/"
api_key_env = "OPENAI_API_KEY"
max_concurrency = 8
[providers.timeouts]
first_byte_ms = 1000

[[providers]]
name = "slow"
type = "mock"
latency_ms = 50

[[models]]
name = "fast"
targets = ["openai/gpt-4o-mini", "slow/anything", "mock/mock"]
"#;
        let c = parse(text, &Overrides::default()).unwrap();
        assert_eq!(c.providers.len(), 2);
        let ProviderKind::OpenAi {
            base_url, timeouts, ..
        } = &c.providers[0].kind
        else {
            panic!("openai provider expected")
        };
        assert_eq!(base_url, "https://api.openai.com/v1");
        assert_eq!(timeouts.first_byte, Duration::from_secs(1));
        assert_eq!(timeouts.idle, Duration::from_secs(30));
        assert_eq!(c.providers[0].max_concurrency, 8);
        assert_eq!(c.models[0].targets[1].provider, "slow");

        for (bad, key) in [
            ("[[providers]]\nname = \"x\"\ntype = \"nope\"\n", "nope"),
            ("[[providers]]\nname = \"x\"\ntype = \"openai\"\nbase_url = \"ftp://a\"\n", "base_url"),
            ("[[providers]]\nname = \"x\"\ntype = \"openai\"\nbase_url = \"http://a\"\napi_key = \"sk\"\n", "api_key"),
            ("[[providers]]\nname = \"mock\"\ntype = \"mock\"\n", "reserved"),
            ("[[models]]\nname = \"m\"\ntargets = [\"ghost/x\"]\n", "ghost/x"),
            ("[[models]]\nname = \"m\"\ntargets = []\n", "targets"),
        ] {
            let msg = parse(bad, &Overrides::default()).unwrap_err().to_string();
            assert!(msg.contains(key), "{bad}: {msg}");
        }
    }

    #[test]
    fn batch_defaults_and_values_from_the_file() {
        let c = parse("", &Overrides::default()).unwrap();
        let b = &c.batch;
        assert_eq!(
            (b.max_items, b.parallelism, b.threads, b.queue),
            (64, 8, 32, 256)
        );
        let text = "[batch]\nmax_items = 10\nparallelism = 2\nthreads = 3\nqueue = 4\n";
        let b = parse(text, &Overrides::default()).unwrap().batch;
        assert_eq!(
            (b.max_items, b.parallelism, b.threads, b.queue),
            (10, 2, 3, 4)
        );
    }

    #[test]
    fn batch_values_must_be_positive_and_known() {
        for key in ["max_items", "parallelism", "threads", "queue"] {
            let msg = parse(&format!("[batch]\n{key} = 0\n"), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&format!("batch.{key}")) && msg.contains("test.toml"),
                "{msg}"
            );
        }
        let msg = parse("[batch]\nthread = 4\n", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("thread"), "{msg}");
    }

    #[test]
    fn bad_listen_address_names_the_key() {
        let msg = parse("listen = \"nonsense\"\n", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("listen"), "{msg}");
    }
}
