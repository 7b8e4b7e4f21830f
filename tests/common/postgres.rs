//! A fresh, empty PostgreSQL database for each test that needs one (issue 14: PostgreSQL as a
//! second store backend), made in the throwaway cluster `scripts/test` starts and names in
//! `SYNCGATE_TEST_POSTGRES_URL`, and dropped when the test ends. Databases are made, dropped and
//! read with `psql`, so the tests need no client crate; the password reaches psql through its
//! environment, never its command line, and no message here ever shows it.

use std::env;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::machine::{find_program, require, terminate};
use super::unique;

/// The cluster's superuser URL, database `postgres`, as `scripts/test` exports it.
pub const POSTGRES_URL_VAR: &str = "SYNCGATE_TEST_POSTGRES_URL";

/// How long one psql run (connecting included) may take before it is stopped.
const PSQL_DEADLINE: Duration = Duration::from_secs(30);

/// A database of its own for one test: empty when made, dropped (even with sessions still
/// open on it) when this is dropped.
pub struct PgDatabase {
    name: String,
    /// The database's URL, password included.
    url: PgUrl,
    /// The URL from the environment, which makes and drops the database.
    admin: PgUrl,
    psql: PathBuf,
}

/// A fresh empty database in the test cluster, or `None` (one line on stderr) when there is no
/// cluster and this run may skip: see `require`.
pub fn fresh_postgres() -> Option<PgDatabase> {
    let url = env::var(POSTGRES_URL_VAR).ok().filter(|u| !u.is_empty());
    let url = require(
        "PostgreSQL (SYNCGATE_TEST_POSTGRES_URL, which ./scripts/test sets)",
        "postgresql",
        url,
    )?;
    let psql = require(
        "psql, PostgreSQL's client",
        "postgresql-client",
        find_psql(),
    )?;
    let admin = PgUrl::parse(&url).unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR}: {e}"));
    let name = database_name(&unique("sg"));
    run_psql(&psql, &admin, &format!("CREATE DATABASE \"{name}\""))
        .unwrap_or_else(|e| panic!("cannot make the test database {name}: {e}"));
    Some(PgDatabase {
        url: admin.with_database(&name),
        name,
        admin,
        psql,
    })
}

impl PgDatabase {
    /// The database's name (`sg_…`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL to hand the code under test: `postgres://user:password@host:port/sg_…`.
    pub fn url(&self) -> String {
        self.url.url()
    }

    /// Runs `sql` in this database; its output (unaligned, no headers or command tags), or what
    /// went wrong.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        run_psql(&self.psql, &self.url, sql)
    }

    /// Runs `sql` in this database, panicking with psql's error when it fails.
    pub fn execute(&self, sql: &str) {
        if let Err(e) = self.try_query(sql) {
            panic!("{e}");
        }
    }

    /// The one value `sql` returns, as text (NULL is ""), panicking when it fails or returns no
    /// row: `pg.query_value("SELECT count(*) FROM requests")`.
    pub fn query_value(&self, sql: &str) -> String {
        let out = self.try_query(sql).unwrap_or_else(|e| panic!("{e}"));
        match out.strip_suffix('\n') {
            Some(value) if !value.contains('\n') => value.to_string(),
            _ => panic!(
                "expected one value from {sql:?} on {}; psql printed {out:?}",
                self.url.redacted()
            ),
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // FORCE ends the sessions still open on it (a pool the test did not close).
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = run_psql(&self.psql, &self.admin, &sql) {
            // No panic in drop: the test's own failure, if any, is the one to see.
            eprintln!("cannot drop the test database {}: {e}", self.name);
        }
    }
}

impl fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgDatabase")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Runs `sql` through psql on the database `url` names (password included, as `url()` gives
/// it); psql's output, or what went wrong.
pub fn psql_at(url: &str, sql: &str) -> Result<String, String> {
    let url = PgUrl::parse(url)?;
    let psql = find_psql().ok_or("psql is not installed (apt-get install postgresql-client)")?;
    run_psql(&psql, &url, sql)
}

/// `unique`'s name made a plain PostgreSQL identifier: `sg-123-4` → `sg_123_4`.
fn database_name(unique: &str) -> String {
    unique
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '_',
        })
        .collect()
}

/// psql from the newest PostgreSQL under /usr/lib/postgresql (Debian's /usr/bin/psql is a Perl
/// wrapper that picks one, slower to start), else the first on PATH.
fn find_psql() -> Option<PathBuf> {
    let mut versions: Vec<(u32, String)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, format!("{}/bin/psql", entry.path().display())))
        })
        .collect();
    versions.sort_unstable_by(|a, b| b.cmp(a));
    let candidates: Vec<&str> = versions.iter().map(|(_, path)| path.as_str()).collect();
    find_program("psql", &candidates)
}

/// One psql run: `sql` on `url`'s database, the password in PGPASSWORD. Errors name the URL
/// without its password.
fn run_psql(psql: &Path, url: &PgUrl, sql: &str) -> Result<String, String> {
    let target = url.redacted();
    let mut cmd = Command::new(psql);
    cmd.args(["--no-psqlrc", "--no-password", "--quiet", "--no-align"])
        .args(["--tuples-only", "--set=ON_ERROR_STOP=1", "--command", sql])
        .args(["--dbname", &target])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match url.password() {
        Some(password) => cmd.env("PGPASSWORD", password),
        None => cmd.env_remove("PGPASSWORD"),
    };
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", psql.display()))?;
    let (status, stdout, stderr) = output_within(child, PSQL_DEADLINE)
        .map_err(|e| format!("psql on {target} running {sql:?}: {e}"))?;
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "psql on {target} failed ({status}) running {sql:?}: {}",
            stderr.trim()
        ))
    }
}

/// Waits for `child` (stdout and stderr piped) and returns its status and output, or stops it
/// when `deadline` passes.
fn output_within(
    mut child: Child,
    deadline: Duration,
) -> Result<(ExitStatus, String, String), String> {
    let stdout = child.stdout.take().map(read_in_thread);
    let stderr = child.stderr.take().map(read_in_thread);
    let end = Instant::now() + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                terminate(&mut child, Duration::from_secs(1));
                return Err(format!("no answer within {deadline:?}; stopped"));
            }
            Err(e) => return Err(format!("cannot wait for psql: {e}")),
        }
    };
    let joined =
        |reader: Option<JoinHandle<String>>| reader.and_then(|r| r.join().ok()).unwrap_or_default();
    Ok((status, joined(stdout), joined(stderr)))
}

fn read_in_thread(mut from: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A `postgres://user:password@host:port/database?options` URL in parts, each as written
/// (percent-encoded). `Debug` shows it without the password.
#[derive(Clone)]
pub struct PgUrl {
    scheme: String,
    user: String,
    password: Option<String>,
    host: String,
    database: String,
    /// `""`, or `?` and the options.
    options: String,
}

impl PgUrl {
    /// Takes `url` apart; the error never repeats it, as it may hold a password.
    pub fn parse(url: &str) -> Result<PgUrl, String> {
        let bad = |why: &str| {
            format!("not a postgres://user:password@host:port/database URL ({why}; URL not shown, it may hold a password)")
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(bad("the scheme is not postgres or postgresql"));
        }
        let (rest, options) = rest.split_at(rest.find('?').unwrap_or(rest.len()));
        let (authority, database) = rest.split_once('/').ok_or_else(|| bad("no database"))?;
        let (userinfo, host) = authority.rsplit_once('@').ok_or_else(|| bad("no user"))?;
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        if user.is_empty() || host.is_empty() || database.is_empty() {
            return Err(bad("a user, a host and a database are needed"));
        }
        Ok(PgUrl {
            scheme: scheme.to_string(),
            user: user.to_string(),
            password: password.map(str::to_string),
            host: host.to_string(),
            database: database.to_string(),
            options: options.to_string(),
        })
    }

    /// The same server and user, another database.
    pub fn with_database(&self, database: &str) -> PgUrl {
        PgUrl {
            database: database.to_string(),
            ..self.clone()
        }
    }

    /// The password, decoded; `None` when the URL has none.
    pub fn password(&self) -> Option<String> {
        self.password.as_deref().map(percent_decode)
    }

    /// The whole URL, password included.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => self.assemble(&format!("{}:{password}", self.user)),
            None => self.redacted(),
        }
    }

    /// The URL without its password, for command lines and messages.
    pub fn redacted(&self) -> String {
        self.assemble(&self.user)
    }

    fn assemble(&self, userinfo: &str) -> String {
        let PgUrl {
            scheme,
            host,
            database,
            options,
            ..
        } = self;
        format!("{scheme}://{userinfo}@{host}/{database}{options}")
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.redacted())
    }
}

/// `%XX` escapes decoded; anything else, malformed escapes included, kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
