//! Where the store lives, as `--db` says: a SQLite file (a path, or `sqlite:PATH`) or a
//! PostgreSQL server (`postgres://…`, `postgresql://…`, or libpq's `key=value` words). Shown
//! only with its password masked, so it can be logged and put in errors.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How long a connection attempt to PostgreSQL may take, unless the URL says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one statement may run on PostgreSQL, unless the URL's options say otherwise.
const STATEMENT_TIMEOUT_MS: u64 = 30_000;

/// The database `--db` names.
#[derive(Clone)]
pub(crate) enum Database {
    Sqlite(PathBuf),
    Postgres(Postgres),
}

/// A PostgreSQL server and database, ready to connect to.
#[derive(Clone)]
pub(crate) struct Postgres {
    pub(crate) config: Box<postgres::Config>,
}

impl Database {
    /// Reads `--db`. A PostgreSQL target without a password takes `PGPASSWORD`, as libpq does.
    pub(crate) fn parse(text: &str) -> Result<Database, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if let Some(path) = text.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("sqlite: needs a file path".into());
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if !is_postgres(text) {
            return Ok(Database::Sqlite(PathBuf::from(text)));
        }
        // The driver's own message may quote the text it could not parse: never echo it.
        let mut config: postgres::Config = text
            .parse()
            .map_err(|_| "is not a valid PostgreSQL URL or connection string".to_string())?;
        if config.get_hosts().is_empty() {
            return Err("names no PostgreSQL host".into());
        }
        if config.get_password().is_none() {
            if let Some(password) = std::env::var_os("PGPASSWORD") {
                config.password(password.to_string_lossy().as_bytes());
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true);
        if config.get_options().is_none() {
            config.options(&format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        }
        Ok(Database::Postgres(Postgres {
            config: Box::new(config),
        }))
    }
}

/// Whether `--db` names a PostgreSQL server rather than a file.
fn is_postgres(text: &str) -> bool {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return true;
    }
    // libpq's `host=… dbname=…` words: every word a key=value pair with a known key.
    const KEYS: &[&str] = &[
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "sslmode",
        "options",
        "connect_timeout",
        "application_name",
    ];
    text.split_whitespace().all(|word| {
        word.split_once('=')
            .is_some_and(|(key, _)| KEYS.contains(&key))
    })
}

impl Postgres {
    /// `host:port/dbname` (the first host), for start-up lines and errors: never a password.
    pub(crate) fn endpoint(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(name)) => name.clone(),
            Some(postgres::config::Host::Unix(dir)) => dir.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self
            .config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres");
        format!("{host}:{port}/{db}")
    }
}

/// The database as it may be shown anywhere: a PostgreSQL password is `***`.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(pg) => {
                let user = pg.config.get_user().unwrap_or("");
                let secret = if pg.config.get_password().is_some() {
                    ":***"
                } else {
                    ""
                };
                let at = if user.is_empty() && secret.is_empty() {
                    ""
                } else {
                    "@"
                };
                write!(f, "postgres://{user}{secret}{at}{}", pg.endpoint())
            }
        }
    }
}

/// Debug shows the same masked form: a `{:?}` must never print a password either.
impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Database({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_sqlite_urls_are_files() {
        for (text, path) in [
            ("./syncgate.db", "./syncgate.db"),
            ("/var/lib/syncgate/db", "/var/lib/syncgate/db"),
            ("sqlite:/tmp/a.db", "/tmp/a.db"),
            ("sqlite:///tmp/a.db", "/tmp/a.db"),
            ("weird=name.db", "weird=name.db"),
        ] {
            match Database::parse(text).unwrap() {
                Database::Sqlite(p) => assert_eq!(p, PathBuf::from(path), "{text}"),
                Database::Postgres(_) => panic!("{text} is a file"),
            }
        }
        assert!(Database::parse("").is_err());
        assert!(Database::parse("sqlite:").is_err());
    }

    #[test]
    fn postgres_urls_and_words_are_servers_shown_without_their_password() {
        for text in [
            "postgres://sg:s3cret-pw@db.example:6543/gateway",
            "postgresql://sg:s3cret-pw@db.example:6543/gateway?sslmode=disable",
            "host=db.example port=6543 user=sg password=s3cret-pw dbname=gateway",
        ] {
            let db = Database::parse(text).unwrap();
            let Database::Postgres(pg) = &db else {
                panic!("{text} is a server")
            };
            assert_eq!(pg.config.get_password(), Some(&b"s3cret-pw"[..]));
            assert_eq!(pg.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
            for shown in [db.to_string(), format!("{db:?}")] {
                assert!(!shown.contains("s3cret"), "{shown}");
                assert!(shown.contains("sg:***@db.example:6543/gateway"), "{shown}");
            }
        }
    }

    #[test]
    fn a_bad_url_is_refused_without_repeating_it() {
        let err = Database::parse("postgres://sg:s3cret@db.example:notaport/x").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
