//! Every metric syncgate exports, declared in one place and rendered on `/metrics` in the
//! Prometheus text format. The `prometheus` crate (no default features: no protobuf) gives us
//! lock-free counters, gauges and histograms and a correct encoder, so we do not hand-write them.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets for whole requests: sub-millisecond fast lane up to multi-minute generations.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];
/// Buckets for time spent queued: mostly microseconds, bounded by max_queue_wait.
const QUEUE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Buckets for syncgate's own time per request: microseconds to a few milliseconds, and on to
/// seconds, so that a p95 past the 500 ms alert (deploy/prometheus) can be computed at all.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00015, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Every reason a request or connection can be refused; each is exported from start, at 0.
pub(crate) const REJECT_REASONS: &[&str] = &[
    "queue_full",
    "queue_timeout",
    "too_many_connections",
    "body_too_large",
    "header_too_large",
    "header_timeout",
    "body_timeout",
    "bad_request",
    "draining",
    "uploads_busy",
];

pub(crate) struct Metrics {
    registry: Registry,
    /// `syncgate_http_requests_total{route,status}`: answered requests, by route template.
    pub(crate) http_requests: IntCounterVec,
    /// `syncgate_http_request_duration_seconds{route}`: head received to response written.
    pub(crate) http_duration: HistogramVec,
    /// `syncgate_queue_wait_seconds`: time from enqueue to a worker taking the request.
    pub(crate) queue_wait: Histogram,
    /// `syncgate_queue_depth`: requests waiting for a worker (set when scraped).
    pub(crate) queue_depth: IntGauge,
    /// `syncgate_queue_capacity`: queue slots.
    pub(crate) queue_capacity: IntGauge,
    /// `syncgate_workers_busy`: workers handling a request (streams included).
    pub(crate) workers_busy: IntGauge,
    /// `syncgate_workers`: worker threads; also the most concurrent streams.
    pub(crate) workers: IntGauge,
    /// `syncgate_streams_open`: streamed answers being written, each holding its worker.
    pub(crate) streams_open: IntGauge,
    /// `syncgate_connections_open`: open client connections (the acceptor enforces the cap on it).
    pub(crate) connections_open: IntGauge,
    /// `syncgate_connections_accepted_total`: connections accepted (refused ones included).
    pub(crate) connections_accepted: IntCounter,
    /// `syncgate_connections_max`: the cap on open connections.
    pub(crate) connections_max: IntGauge,
    /// `syncgate_rejected_total{reason}`: requests or connections refused by a limit.
    pub(crate) rejected: IntCounterVec,
    /// `syncgate_handler_panics_total`: handler panics turned into 500s.
    pub(crate) handler_panics: IntCounter,
    /// `syncgate_accept_errors_total`: failed accepts (EMFILE, ECONNABORTED, …), survived.
    pub(crate) accept_errors: IntCounter,
    /// `syncgate_overhead_seconds`: a request's time not spent blocked on a provider.
    pub(crate) overhead: Histogram,
    /// `syncgate_upstream_duration_seconds{provider}`: one attempt, send to last byte.
    pub(crate) upstream_duration: HistogramVec,
    /// `syncgate_upstream_first_byte_seconds{provider}`: send to response head.
    pub(crate) upstream_first_byte: HistogramVec,
    /// `syncgate_upstream_requests_total{provider,outcome}`: attempts by how they ended.
    pub(crate) upstream_requests: IntCounterVec,
    /// `syncgate_upstream_retries_total{provider}`: retries taken.
    pub(crate) upstream_retries: IntCounterVec,
    /// `syncgate_upstream_in_flight{provider}`: calls holding a concurrency slot.
    pub(crate) upstream_in_flight: IntGaugeVec,
    /// `syncgate_upstream_concurrency_limit{provider}`: a provider's cap on calls in flight
    /// (`max_concurrency`); absent for the built-in mock, which has none.
    pub(crate) upstream_concurrency_limit: IntGaugeVec,
    /// `syncgate_tokens_total{provider,model,kind}`: prompt and completion tokens reported.
    pub(crate) tokens: IntCounterVec,
    /// `syncgate_spend_usd_total{model}`: what priced calls cost, by the model asked for (no
    /// key label: keys are unbounded).
    pub(crate) spend: CounterVec,
    /// `syncgate_auth_failures_total{reason}`: requests turned away for their key.
    pub(crate) auth_failures: IntCounterVec,
    /// `syncgate_rate_limited_total{limit}`: requests refused by a key's limit.
    pub(crate) rate_limited: IntCounterVec,
    /// `syncgate_knowledge_ingested_total{outcome}`: files ingested into a vector store
    /// (`completed` or `failed`).
    pub(crate) knowledge_ingested: IntCounterVec,
    /// `syncgate_knowledge_search_seconds`: a vector-store search, its embedding included.
    pub(crate) knowledge_search: Histogram,
    /// `syncgate_knowledge_cache_bytes`, `…_cache_stores`: vectors held for search (set when
    /// scraped).
    pub(crate) knowledge_cache_bytes: IntGauge,
    pub(crate) knowledge_cache_stores: IntGauge,
    /// `syncgate_knowledge_files`, `syncgate_knowledge_chunks`: files stored and chunks held
    /// in every vector store (counted every 10 s by the job lease thread).
    pub(crate) knowledge_files: IntGauge,
    pub(crate) knowledge_chunks: IntGauge,
    /// `syncgate_knowledge_cache_lookups_total{result}`: hits and misses (set when scraped).
    pub(crate) knowledge_cache_lookups: IntCounterVec,
    /// `syncgate_limit_store_errors_total{outcome}`: keyed requests whose shared limits could
    /// not be checked (PostgreSQL unreachable, lease lost), `refused` or `admitted` as
    /// `[limits] on_store_error` says.
    pub(crate) limit_store_errors: IntCounterVec,
    /// `syncgate_batch_items`: calls per `POST /api/batch`.
    pub(crate) batch_items: Histogram,
    /// `syncgate_batch_pool_busy`: batch threads running a call.
    pub(crate) batch_pool_busy: IntGauge,
    /// `syncgate_batch_pool_queue_depth`: batch calls waiting for a thread (set when scraped).
    pub(crate) batch_pool_queue_depth: IntGauge,
    /// `syncgate_uploads_held`: file uploads read or being answered, each held in memory whole
    /// (set when scraped).
    pub(crate) uploads_held: IntGauge,
    pub(crate) store: StoreMetrics,
    pub(crate) jobs: JobMetrics,
}

/// The job runner's metrics.
pub(crate) struct JobMetrics {
    /// `syncgate_jobs{state}`: jobs in the database by state (refreshed every second or so).
    pub(crate) by_state: IntGaugeVec,
    /// `syncgate_job_wait_seconds`: submission to the first start of a job.
    pub(crate) wait_seconds: Histogram,
    /// `syncgate_job_run_seconds`: one attempt, start to end.
    pub(crate) run_seconds: Histogram,
}

/// The database's metrics; cheap to clone (each is a shared handle) for the writer thread.
#[derive(Clone)]
pub(crate) struct StoreMetrics {
    /// `syncgate_store_batch_rows`: rows and writes committed per transaction.
    pub(crate) batch_rows: Histogram,
    /// `syncgate_store_commit_seconds`: time to run and commit one batch.
    pub(crate) commit_seconds: Histogram,
    /// `syncgate_store_queue_depth`: rows and writes waiting for the writer (set when scraped).
    pub(crate) queue_depth: IntGauge,
    /// `syncgate_store_log_rows_dropped_total`: request-log rows dropped (queue full, failed commit).
    pub(crate) log_rows_dropped: IntCounter,
    /// `syncgate_store_log_rows_expired_total`: request-log rows deleted by retention.
    pub(crate) log_rows_expired: IntCounter,
    /// `syncgate_store_jobs_expired_total`: finished jobs deleted by retention.
    pub(crate) jobs_expired: IntCounter,
    /// `syncgate_store_read_connections_in_use`: read connections taken from the pool.
    pub(crate) reads_in_use: IntGauge,
    /// `syncgate_store_read_seconds`: how long a read connection was held, its queries included.
    pub(crate) read_seconds: Histogram,
    /// `syncgate_store_errors_total{kind}`: store errors met by requests and background work,
    /// by [`STORE_ERROR_KINDS`]; counted where each is handled. Request-log rows lost to a
    /// failed commit are `log_rows_dropped` instead: no caller waits for them.
    pub(crate) errors: IntCounterVec,
}

/// Every `kind` of `syncgate_store_errors_total`: the writer's queue or the read pool stayed
/// full, the store was closing, the database server could not be reached, the database
/// refused.
pub(crate) const STORE_ERROR_KINDS: &[&str] = &["busy", "closed", "unavailable", "failed"];

/// Calls per batch: one up to far beyond the default `[batch] max_items` of 64.
const BATCH_ITEM_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Rows per transaction: one acknowledged write alone up to a full batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
/// Commit times: an unsynced append to a synced batch on a slow disk.
const COMMIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

impl StoreMetrics {
    fn new() -> StoreMetrics {
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid metric")
        };
        StoreMetrics {
            batch_rows: histogram(
                "syncgate_store_batch_rows",
                "Rows and acknowledged writes committed in one transaction",
                BATCH_BUCKETS,
            ),
            commit_seconds: histogram(
                "syncgate_store_commit_seconds",
                "Time to write and commit one batch",
                COMMIT_BUCKETS,
            ),
            queue_depth: IntGauge::new(
                "syncgate_store_queue_depth",
                "Rows and writes waiting for the database writer",
            )
            .expect("valid metric"),
            log_rows_dropped: IntCounter::new(
                "syncgate_store_log_rows_dropped_total",
                "Request-log rows dropped: queue full past its bound, or a failed commit",
            )
            .expect("valid metric"),
            log_rows_expired: IntCounter::new(
                "syncgate_store_log_rows_expired_total",
                "Request-log rows deleted for being older than [log] retention_days",
            )
            .expect("valid metric"),
            jobs_expired: IntCounter::new(
                "syncgate_store_jobs_expired_total",
                "Finished jobs deleted for having finished more than [jobs] retention_days ago",
            )
            .expect("valid metric"),
            reads_in_use: IntGauge::new(
                "syncgate_store_read_connections_in_use",
                "Read connections taken from the pool",
            )
            .expect("valid metric"),
            read_seconds: histogram(
                "syncgate_store_read_seconds",
                "Time a read connection was held, its queries included",
                COMMIT_BUCKETS,
            ),
            errors: {
                let errors = IntCounterVec::new(
                    Opts::new(
                        "syncgate_store_errors_total",
                        "Store errors met by requests and background work: busy (queue or read pool full), closed, failed (the database refused)",
                    ),
                    &["kind"],
                )
                .expect("valid metric");
                for kind in STORE_ERROR_KINDS {
                    errors.with_label_values(&[kind]);
                }
                errors
            },
        }
    }

    /// Counts a store error where it is handled; `kind` is one of [`STORE_ERROR_KINDS`].
    pub(crate) fn count_error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "syncgate_http_requests_total",
                "HTTP requests answered, by route template and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "syncgate_http_request_duration_seconds",
                "Time from the request head arriving to the response written",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "syncgate_queue_wait_seconds",
                "Time a request waited for a worker",
            )
            .buckets(QUEUE_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "syncgate_rejected_total",
                "Requests or connections refused by a limit",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in REJECT_REASONS {
            rejected.with_label_values(&[reason]);
        }
        let by_provider = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &["provider"],
            )
            .expect("valid metric")
        };
        let metrics = Metrics {
            overhead: Histogram::with_opts(
                HistogramOpts::new(
                    "syncgate_overhead_seconds",
                    "Time a request spent in syncgate itself, not blocked on a provider",
                )
                .buckets(OVERHEAD_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            upstream_duration: by_provider(
                "syncgate_upstream_duration_seconds",
                "One provider attempt, from sending to the last byte",
                REQUEST_BUCKETS,
            ),
            upstream_first_byte: by_provider(
                "syncgate_upstream_first_byte_seconds",
                "One provider attempt, from sending to the response head",
                REQUEST_BUCKETS,
            ),
            upstream_requests: IntCounterVec::new(
                Opts::new(
                    "syncgate_upstream_requests_total",
                    "Provider attempts by outcome",
                ),
                &["provider", "outcome"],
            )
            .expect("valid metric"),
            upstream_retries: IntCounterVec::new(
                Opts::new("syncgate_upstream_retries_total", "Provider retries taken"),
                &["provider"],
            )
            .expect("valid metric"),
            upstream_in_flight: IntGaugeVec::new(
                Opts::new(
                    "syncgate_upstream_in_flight",
                    "Provider calls holding a concurrency slot",
                ),
                &["provider"],
            )
            .expect("valid metric"),
            upstream_concurrency_limit: IntGaugeVec::new(
                Opts::new(
                    "syncgate_upstream_concurrency_limit",
                    "A provider's cap on calls in flight (max_concurrency)",
                ),
                &["provider"],
            )
            .expect("valid metric"),
            tokens: IntCounterVec::new(
                Opts::new("syncgate_tokens_total", "Tokens reported by providers"),
                &["provider", "model", "kind"],
            )
            .expect("valid metric"),
            spend: CounterVec::new(
                Opts::new(
                    "syncgate_spend_usd_total",
                    "What priced calls cost, US dollars, by the model asked for",
                ),
                &["model"],
            )
            .expect("valid metric"),
            http_requests,
            http_duration,
            queue_wait,
            queue_depth: gauge("syncgate_queue_depth", "Requests waiting for a worker"),
            queue_capacity: gauge(
                "syncgate_queue_capacity",
                "Queue slots in front of the workers",
            ),
            workers_busy: gauge("syncgate_workers_busy", "Workers handling a request"),
            workers: gauge(
                "syncgate_workers",
                "Worker threads (also the most concurrent streams)",
            ),
            streams_open: gauge(
                "syncgate_streams_open",
                "Streamed answers being written, each holding its worker",
            ),
            connections_open: gauge("syncgate_connections_open", "Open client connections"),
            connections_accepted: IntCounter::new(
                "syncgate_connections_accepted_total",
                "Client connections accepted, refused ones included",
            )
            .expect("valid metric"),
            connections_max: gauge("syncgate_connections_max", "Most open client connections"),
            rejected,
            handler_panics: IntCounter::new(
                "syncgate_handler_panics_total",
                "Handler panics answered with a 500",
            )
            .expect("valid metric"),
            accept_errors: IntCounter::new(
                "syncgate_accept_errors_total",
                "Failed accepts, survived",
            )
            .expect("valid metric"),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "syncgate_auth_failures_total",
                    "Requests turned away for their key (missing, unknown, revoked, expired, model not allowed, not admin)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "syncgate_rate_limited_total",
                    "Requests refused by a key's limit (requests, tokens, in_flight)",
                ),
                &["limit"],
            )
            .expect("valid metric"),
            knowledge_ingested: IntCounterVec::new(
                Opts::new(
                    "syncgate_knowledge_ingested_total",
                    "Files ingested into a vector store, by outcome (completed, failed)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            limit_store_errors: IntCounterVec::new(
                Opts::new(
                    "syncgate_limit_store_errors_total",
                    "Keyed requests whose shared limits could not be checked, refused or admitted as [limits] on_store_error says",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            knowledge_search: Histogram::with_opts(
                HistogramOpts::new(
                    "syncgate_knowledge_search_seconds",
                    "Vector store searches, the query's embedding included",
                )
                .buckets(REQUEST_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            knowledge_cache_bytes: gauge(
                "syncgate_knowledge_cache_bytes",
                "Bytes of vector stores' vectors held for search ([knowledge] cache_mb)",
            ),
            knowledge_cache_stores: gauge(
                "syncgate_knowledge_cache_stores",
                "Vector stores whose vectors are held for search",
            ),
            knowledge_files: gauge("syncgate_knowledge_files", "Files stored (/v1/files)"),
            knowledge_chunks: gauge(
                "syncgate_knowledge_chunks",
                "Chunks held across every vector store",
            ),
            knowledge_cache_lookups: IntCounterVec::new(
                Opts::new(
                    "syncgate_knowledge_cache_lookups_total",
                    "Searches that found their store's vectors held (hit) or loaded them (miss)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            batch_items: Histogram::with_opts(
                HistogramOpts::new("syncgate_batch_items", "Calls per POST /api/batch")
                    .buckets(BATCH_ITEM_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            batch_pool_busy: gauge(
                "syncgate_batch_pool_busy",
                "Batch threads running a call",
            ),
            batch_pool_queue_depth: gauge(
                "syncgate_batch_pool_queue_depth",
                "Batch calls waiting for a batch thread",
            ),
            uploads_held: gauge(
                "syncgate_uploads_held",
                "File uploads held in memory: being read or answered",
            ),
            store: StoreMetrics::new(),
            jobs: JobMetrics {
                by_state: IntGaugeVec::new(
                    Opts::new("syncgate_jobs", "Durable jobs in the database, by state"),
                    &["state"],
                )
                .expect("valid metric"),
                wait_seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "syncgate_job_wait_seconds",
                        "Time from a job's submission to its first start",
                    )
                    .buckets(REQUEST_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
                run_seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "syncgate_job_run_seconds",
                        "Time one attempt of a job ran",
                    )
                    .buckets(REQUEST_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            },
            registry,
        };
        metrics.register_all();
        for reason in crate::auth::DENIAL_REASONS {
            metrics.auth_failures.with_label_values(&[reason]);
        }
        for limit in ["requests", "tokens", "in_flight"] {
            metrics.rate_limited.with_label_values(&[limit]);
        }
        for outcome in ["completed", "failed"] {
            metrics.knowledge_ingested.with_label_values(&[outcome]);
        }
        for outcome in ["refused", "admitted"] {
            metrics.limit_store_errors.with_label_values(&[outcome]);
        }
        for state in crate::jobs::state_names() {
            metrics.jobs.by_state.with_label_values(&[state]);
        }
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.http_requests.clone()),
            Box::new(self.http_duration.clone()),
            Box::new(self.queue_wait.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.queue_capacity.clone()),
            Box::new(self.workers_busy.clone()),
            Box::new(self.workers.clone()),
            Box::new(self.streams_open.clone()),
            Box::new(self.connections_open.clone()),
            Box::new(self.connections_accepted.clone()),
            Box::new(self.connections_max.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.handler_panics.clone()),
            Box::new(self.accept_errors.clone()),
            Box::new(self.overhead.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.upstream_first_byte.clone()),
            Box::new(self.upstream_requests.clone()),
            Box::new(self.upstream_retries.clone()),
            Box::new(self.upstream_in_flight.clone()),
            Box::new(self.upstream_concurrency_limit.clone()),
            Box::new(self.tokens.clone()),
            Box::new(self.spend.clone()),
            Box::new(self.auth_failures.clone()),
            Box::new(self.rate_limited.clone()),
            Box::new(self.knowledge_ingested.clone()),
            Box::new(self.knowledge_search.clone()),
            Box::new(self.knowledge_cache_bytes.clone()),
            Box::new(self.knowledge_cache_stores.clone()),
            Box::new(self.knowledge_files.clone()),
            Box::new(self.knowledge_chunks.clone()),
            Box::new(self.knowledge_cache_lookups.clone()),
            Box::new(self.limit_store_errors.clone()),
            Box::new(self.jobs.by_state.clone()),
            Box::new(self.jobs.wait_seconds.clone()),
            Box::new(self.jobs.run_seconds.clone()),
            Box::new(self.batch_items.clone()),
            Box::new(self.batch_pool_busy.clone()),
            Box::new(self.batch_pool_queue_depth.clone()),
            Box::new(self.uploads_held.clone()),
            Box::new(self.store.batch_rows.clone()),
            Box::new(self.store.commit_seconds.clone()),
            Box::new(self.store.queue_depth.clone()),
            Box::new(self.store.log_rows_dropped.clone()),
            Box::new(self.store.log_rows_expired.clone()),
            Box::new(self.store.jobs_expired.clone()),
            Box::new(self.store.reads_in_use.clone()),
            Box::new(self.store.read_seconds.clone()),
            Box::new(self.store.errors.clone()),
        ];
        for c in collectors {
            self.registry
                .register(c)
                .expect("each metric registered once");
        }
    }

    /// Times a vector-store search.
    pub(crate) fn knowledge_search(&self, seconds: f64) {
        self.knowledge_search.observe(seconds);
    }

    /// Counts a file's ingestion by its outcome (`completed` or `failed`).
    pub(crate) fn knowledge_ingest(&self, outcome: &str) {
        self.knowledge_ingested.with_label_values(&[outcome]).inc();
    }

    /// Counts a refusal; `reason` is one of [`REJECT_REASONS`].
    pub(crate) fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Counts one answered request and how long it took.
    pub(crate) fn observe_request(&self, route: &str, status: u16, seconds: f64) {
        self.count_request(route, status);
        self.http_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// Counts one answered request whose duration means nothing (refused while being read).
    pub(crate) fn count_request(&self, route: &str, status: u16) {
        let buf = itoa_status(status);
        let status = std::str::from_utf8(&buf).unwrap_or("0");
        self.http_requests.with_label_values(&[route, status]).inc();
    }

    /// Shows a provider's gauges and counters from the start, at zero.
    /// Shows a provider's series from the start; `cap` is its `max_concurrency`, if it has one.
    pub(crate) fn register_provider(&self, provider: &str, cap: Option<usize>) {
        self.upstream_in_flight.with_label_values(&[provider]);
        self.upstream_retries.with_label_values(&[provider]);
        // Histograms too: a series born with its first observation loses that observation
        // from every rate() over it.
        self.upstream_duration.with_label_values(&[provider]);
        self.upstream_first_byte.with_label_values(&[provider]);
        if let Some(cap) = cap {
            self.upstream_concurrency_limit
                .with_label_values(&[provider])
                .set(i64::try_from(cap).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn upstream_outcome(&self, provider: &str, outcome: &str) {
        self.upstream_requests
            .with_label_values(&[provider, outcome])
            .inc();
    }

    pub(crate) fn upstream_duration(&self, provider: &str, took: Duration) {
        self.upstream_duration
            .with_label_values(&[provider])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_first_byte(&self, provider: &str, took: Duration) {
        self.upstream_first_byte
            .with_label_values(&[provider])
            .observe(took.as_secs_f64());
    }

    /// Counts the tokens of one answer.
    pub(crate) fn count_tokens(&self, provider: &str, model: &str, usage: crate::tokens::Usage) {
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            self.tokens
                .with_label_values(&[provider, model, kind])
                .inc_by(n);
        }
    }

    /// Counts what a priced call cost.
    pub(crate) fn count_spend(&self, model: &str, micros: i64) {
        if micros > 0 {
            self.spend
                .with_label_values(&[model])
                .inc_by(crate::spend::usd(micros));
        }
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding our own well-formed families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// A gauge raised while this is alive: lowered on drop, also when a panic unwinds past it.
pub(crate) struct Raised<'a>(&'a IntGauge);

impl Raised<'_> {
    pub(crate) fn new(gauge: &IntGauge) -> Raised<'_> {
        gauge.inc();
        Raised(gauge)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A histogram's cumulative bucket counts, summed over its label values (all providers, say):
/// one per finite upper bound, then the total (the `+Inf` bucket). With `bounds`, for
/// quantiles over a window of two such readings (the console's `/api/status`).
pub(crate) fn cumulative_buckets(collector: &dyn Collector, bounds: &mut Vec<f64>) -> Vec<u64> {
    let mut counts: Vec<u64> = Vec::new();
    bounds.clear();
    for family in collector.collect() {
        for metric in family.get_metric() {
            let histogram = metric.get_histogram();
            let buckets = histogram.get_bucket();
            if counts.is_empty() {
                counts = vec![0; buckets.len() + 1];
                bounds.extend(buckets.iter().map(|b| b.upper_bound()));
            }
            for (sum, bucket) in counts.iter_mut().zip(buckets) {
                *sum += bucket.cumulative_count();
            }
            if let Some(total) = counts.last_mut() {
                *total += histogram.get_sample_count();
            }
        }
    }
    counts
}

/// The sum of a counter family's series whose `label` value passes `keep`.
pub(crate) fn counter_sum(
    counters: &IntCounterVec,
    label: &str,
    keep: impl Fn(&str) -> bool,
) -> u64 {
    let mut sum = 0.0;
    for family in counters.collect() {
        for metric in family.get_metric() {
            let value = metric
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map_or("", |l| l.value());
            if keep(value) {
                sum += metric.get_counter().get_value();
            }
        }
    }
    sum as u64
}

/// A status code as three ASCII digits, without allocating.
fn itoa_status(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lists_every_metric_and_reason() {
        let m = Metrics::new();
        m.observe_request("/v1/chat/completions", 200, 0.01);
        m.reject("queue_full");
        m.register_provider("capped", Some(8));
        m.register_provider("mock", None);
        m.store.count_error("busy");
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "syncgate_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
            "syncgate_http_request_duration_seconds_bucket",
            "syncgate_queue_wait_seconds_bucket",
            "syncgate_queue_depth",
            "syncgate_queue_capacity",
            "syncgate_workers_busy",
            "syncgate_workers ",
            "syncgate_streams_open 0",
            "syncgate_connections_open",
            "syncgate_rejected_total{reason=\"queue_full\"} 1",
            "syncgate_rejected_total{reason=\"draining\"} 0",
            "syncgate_handler_panics_total",
            "syncgate_accept_errors_total",
            "syncgate_batch_items_bucket",
            "syncgate_batch_pool_busy 0",
            "syncgate_batch_pool_queue_depth 0",
            "syncgate_uploads_held 0",
            "syncgate_upstream_concurrency_limit{provider=\"capped\"} 8",
            "syncgate_upstream_in_flight{provider=\"mock\"} 0",
            "syncgate_upstream_first_byte_seconds_count{provider=\"capped\"} 0",
            "syncgate_upstream_duration_seconds_count{provider=\"capped\"} 0",
            "syncgate_store_errors_total{kind=\"busy\"} 1",
            "syncgate_store_errors_total{kind=\"failed\"} 0",
            "syncgate_store_read_seconds_bucket",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(
            !text.contains("syncgate_upstream_concurrency_limit{provider=\"mock\"}"),
            "a provider without a cap has no limit series:\n{text}"
        );
    }

    #[test]
    fn status_digits() {
        assert_eq!(&itoa_status(503), b"503");
        assert_eq!(&itoa_status(200), b"200");
    }
}
