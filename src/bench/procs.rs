//! The processes the bench runs: its own `mock-upstream` and its own `syncgate serve`, both this
//! very binary, each killed and reaped by pid when its guard drops (after a scenario, on an
//! error, on Ctrl-C) and, should the bench itself die, by the kernel (`PR_SET_PDEATHSIG`).
//! [`Fleet`] keeps one of each and restarts them only when a scenario needs other settings.
//! A gateway on PostgreSQL gets a scratch database of its own, dropped once it has stopped.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::postgres::ScratchDatabase;
use crate::database::{Database, Postgres};

/// How long a child may take to print its `listening on` line.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// How the mock upstream is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MockSpec {
    pub(crate) latency_ms: u64,
    pub(crate) stream_chunks: u64,
    pub(crate) stream_interval_ms: u64,
}

impl MockSpec {
    /// An upstream that answers after `latency_ms` (its streams: 16 chunks, no gaps).
    pub(crate) fn latency(latency_ms: u64) -> MockSpec {
        MockSpec {
            latency_ms,
            stream_chunks: 16,
            stream_interval_ms: 0,
        }
    }
}

/// The gateway's `[capacity]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GatewaySpec {
    pub(crate) workers: usize,
    pub(crate) queue: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_queue_wait_ms: u64,
    /// Whether the gateway writes its request log (the logging scenario compares both).
    pub(crate) log_requests: bool,
    /// Where it keeps its store.
    pub(crate) backend: Backend,
}

/// The store a gateway runs on: a SQLite file in the bench's directory, or a scratch database
/// on the PostgreSQL server `--db` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// As the report names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// A child process of the bench, killed and reaped on drop.
pub(crate) struct Proc {
    child: Child,
    /// Kept open so a late line on stdout never meets a closed pipe.
    _stdout: BufReader<ChildStdout>,
    pub(crate) addr: SocketAddr,
    log: PathBuf,
}

impl Proc {
    /// Runs `exe ARGS` with `RUST_LOG=warn` and `env`, stderr to `log`, and waits for its
    /// readiness line.
    fn spawn(
        exe: &Path,
        args: &[String],
        env: &[(String, OsString)],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                File::create(&log).with_context(|| format!("cannot create {}", log.display()))?,
            );
        // The bench decides every setting: none may leak in from the caller's environment.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SYNCGATE_") {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: prctl is async-signal-safe and touches no memory of ours. It asks the kernel
        // to kill the child when the thread that spawned it ends; the bench spawns only from
        // its main thread, which lives until the bench exits.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} {}", exe.display(), args.join(" ")))?;
        let stdout = child.stdout.take().context("child has no stdout")?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let read = stdout.read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
            stdout
        });
        let first = rx.recv_timeout(STARTUP_DEADLINE);
        let addr = match &first {
            Ok(Ok(line)) => parse_listening(line),
            _ => None,
        };
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            let said = match first {
                Ok(Ok(line)) if !line.is_empty() => format!("it printed {line:?}"),
                Ok(_) => "it exited".to_string(),
                Err(_) => format!("it said nothing for {STARTUP_DEADLINE:?}"),
            };
            bail!(
                "{} {} did not start: {said}; its log:\n{}",
                exe.display(),
                args.join(" "),
                tail(&log)
            );
        };
        let stdout = reader
            .join()
            .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
        Ok(Proc {
            child,
            _stdout: stdout,
            addr,
            log,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of its log, if the process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "process {} exited ({status}); its log:\n{}",
                self.pid(),
                tail(&self.log)
            ),
            Err(e) => bail!("cannot check process {}: {e}", self.pid()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // By pid (Child::kill sends SIGKILL to this child only), then reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = line.trim().strip_prefix("listening on http://")?;
    rest.trim_end_matches('/').parse().ok()
}

/// The last lines of a log file, for an error message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The gateway's configuration: one model, `bench`, on one provider, the mock upstream.
pub(crate) fn gateway_toml(upstream: SocketAddr, spec: &GatewaySpec) -> String {
    format!(
        r#"[capacity]
workers = {workers}
queue = {queue}
max_connections = {max_connections}
max_queue_wait_ms = {max_queue_wait_ms}

[log]
requests = {log_requests}

[[providers]]
name = "up"
type = "openai"
base_url = "http://{upstream}/v1"
max_concurrency = 100000
[providers.timeouts]
first_byte_ms = 60000
idle_ms = 30000
total_ms = 600000

[[models]]
name = "bench"
targets = ["up/bench-model"]
"#,
        workers = spec.workers,
        queue = spec.queue,
        max_connections = spec.max_connections,
        max_queue_wait_ms = spec.max_queue_wait_ms,
        log_requests = spec.log_requests,
    )
}

/// The bench's mock upstream and gateway, started on demand and restarted when a scenario
/// needs other settings. Dropping the fleet stops both.
pub(crate) struct Fleet {
    exe: PathBuf,
    dir: PathBuf,
    /// The server gateways on [`Backend::Postgres`] make their scratch databases on.
    postgres: Option<Postgres>,
    mock: Option<(MockSpec, Proc)>,
    gateway: Option<Gateway>,
    starts: u32,
}

/// A running gateway. The fields drop in order: the process is killed and reaped before its
/// scratch database is dropped.
struct Gateway {
    spec: GatewaySpec,
    proc: Proc,
    _database: Option<ScratchDatabase>,
}

impl Fleet {
    pub(crate) fn new(exe: PathBuf, postgres: Option<Postgres>) -> anyhow::Result<Fleet> {
        let dir = std::env::temp_dir().join(format!("syncgate-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Fleet {
            exe,
            dir,
            postgres,
            mock: None,
            gateway: None,
            starts: 0,
        })
    }

    /// The mock upstream with `spec`, started (or restarted) if need be.
    pub(crate) fn upstream(&mut self, spec: MockSpec) -> anyhow::Result<SocketAddr> {
        if let Some((running, proc)) = &mut self.mock {
            if *running == spec {
                proc.check_alive()?;
                return Ok(proc.addr);
            }
        }
        // The gateway points at the old mock's port: it goes too.
        self.gateway = None;
        self.mock = None;
        self.starts += 1;
        let args: Vec<String> = [
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--latency-ms",
            &spec.latency_ms.to_string(),
            "--stream-chunks",
            &spec.stream_chunks.to_string(),
            "--stream-interval-ms",
            &spec.stream_interval_ms.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let log = self.dir.join(format!("mock-{}.log", self.starts));
        let proc = Proc::spawn(&self.exe, &args, &[], log)?;
        let addr = proc.addr;
        self.mock = Some((spec, proc));
        Ok(addr)
    }

    /// The pid of the running mock upstream.
    pub(crate) fn upstream_pid(&self) -> Option<u32> {
        self.mock.as_ref().map(|(_, proc)| proc.pid())
    }

    /// The gateway with `spec` in front of the mock upstream with `upstream`.
    pub(crate) fn gateway(
        &mut self,
        upstream: MockSpec,
        spec: GatewaySpec,
    ) -> anyhow::Result<&mut Proc> {
        let upstream_addr = self.upstream(upstream)?;
        let reuse = matches!(&self.gateway, Some(running) if running.spec == spec);
        if !reuse {
            self.gateway = None;
            self.starts += 1;
            let config = self.dir.join(format!("gateway-{}.toml", self.starts));
            fs::write(&config, gateway_toml(upstream_addr, &spec))
                .with_context(|| format!("cannot write {}", config.display()))?;
            let (database, db, env) = match spec.backend {
                Backend::Sqlite => {
                    let file = self.dir.join("syncgate.db").display().to_string();
                    (None, file, Vec::new())
                }
                Backend::Postgres => {
                    let server = self
                        .postgres
                        .as_ref()
                        .context("a gateway on PostgreSQL needs --db postgres://…")?;
                    let scratch =
                        ScratchDatabase::create(server, &format!("gateway_{}", self.starts))?;
                    let (url, env) = scratch.serve_args();
                    (Some(scratch), url, env)
                }
            };
            let args: Vec<String> = vec![
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--config".into(),
                config.display().to_string(),
                "--db".into(),
                db,
            ];
            let log = self.dir.join(format!("gateway-{}.log", self.starts));
            let proc = Proc::spawn(&self.exe, &args, &env, log)?;
            self.gateway = Some(Gateway {
                spec,
                proc,
                _database: database,
            });
        }
        let gateway = self.gateway.as_mut().context("gateway not running")?;
        gateway.proc.check_alive()?;
        Ok(&mut gateway.proc)
    }

    /// `n` gateways with `spec` side by side on one store, in front of the mock upstream with
    /// `upstream` (the cluster scenario). On PostgreSQL they share one scratch database, on
    /// SQLite one file; `tag` names either. The fleet's own gateway is stopped first, so it
    /// takes no CPU from them.
    pub(crate) fn gateways(
        &mut self,
        upstream: MockSpec,
        spec: GatewaySpec,
        n: usize,
        tag: &str,
    ) -> anyhow::Result<Gateways> {
        self.gateway = None;
        let upstream_addr = self.upstream(upstream)?;
        self.starts += 1;
        let config = self.dir.join(format!("{tag}.toml"));
        fs::write(&config, gateway_toml(upstream_addr, &spec))
            .with_context(|| format!("cannot write {}", config.display()))?;
        let (database, store, db, env) = match spec.backend {
            Backend::Sqlite => {
                let file = self.dir.join(format!("{tag}.db"));
                for suffix in ["", "-wal", "-shm"] {
                    let _ = fs::remove_file(format!("{}{suffix}", file.display()));
                }
                let db = file.display().to_string();
                (None, Database::Sqlite(file), db, Vec::new())
            }
            Backend::Postgres => {
                let server = self
                    .postgres
                    .as_ref()
                    .context("gateways on PostgreSQL need --db postgres://…")?;
                let scratch = ScratchDatabase::create(server, tag)?;
                let (url, env) = scratch.serve_args();
                let store = scratch.database();
                (Some(scratch), store, url, env)
            }
        };
        let mut gateways = Gateways {
            procs: Vec::with_capacity(n),
            store,
            _database: database,
        };
        for i in 0..n {
            let args: Vec<String> = vec![
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--config".into(),
                config.display().to_string(),
                "--db".into(),
                db.clone(),
            ];
            let log = self.dir.join(format!("{tag}-{i}.log"));
            gateways
                .procs
                .push(Proc::spawn(&self.exe, &args, &env, log)?);
        }
        Ok(gateways)
    }
}

/// Gateways started together on one store. The fields drop in order: every process is killed
/// and reaped before their scratch database is dropped.
pub(crate) struct Gateways {
    pub(crate) procs: Vec<Proc>,
    /// The store they share, for the bench to open (to make API keys in it).
    pub(crate) store: Database,
    _database: Option<ScratchDatabase>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.gateway = None;
        self.mock = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_config_is_valid() {
        let spec = GatewaySpec {
            workers: 8,
            queue: 16,
            max_connections: 100,
            max_queue_wait_ms: 60_000,
            log_requests: true,
            backend: Backend::Sqlite,
        };
        let toml = gateway_toml("127.0.0.1:4000".parse().unwrap(), &spec);
        let path = std::env::temp_dir().join(format!("bench-config-{}.toml", std::process::id()));
        fs::write(&path, &toml).unwrap();
        let config = crate::config::Config::resolve(Some(&path), &Default::default());
        fs::remove_file(&path).unwrap();
        let config = config.unwrap();
        assert_eq!(config.capacity.workers, 8);
        assert_eq!(config.capacity.queue, 16);
        assert_eq!(config.models[0].name, "bench");
    }

    #[test]
    fn the_readiness_line_gives_the_address() {
        assert_eq!(
            parse_listening("listening on http://127.0.0.1:4321\n"),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(parse_listening("starting"), None);
    }
}
