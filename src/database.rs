//! Where the store lives, as `--db` says: a SQLite file (a path, or `sqlite:PATH`) or a
//! PostgreSQL server (`postgres://…`, `postgresql://…`, or libpq's `key=value` words). Shown
//! only with its password masked, so it can be logged and put in errors. `sslmode` and
//! `sslrootcert` are read here, as libpq reads them: the driver knows only three of the modes.

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
    /// How the connection uses TLS; the driver's own mode is set from it.
    pub(crate) ssl_mode: SslMode,
    /// `sslrootcert`: a PEM file of the CA certificates to trust; `None` trusts webpki-roots.
    pub(crate) ssl_root_cert: Option<PathBuf>,
}

/// libpq's `sslmode`, all of it that means something without client certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, with any certificate; plain otherwise. The default.
    Prefer,
    /// TLS or no connection; the certificate is checked only when `sslrootcert` names CAs
    /// (then as `VerifyCa`), as libpq does.
    Require,
    /// TLS with a certificate signed by a trusted CA, for whatever host it names.
    VerifyCa,
    /// TLS with a certificate signed by a trusted CA and naming the host connected to.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    fn parse(value: &str) -> Result<SslMode, String> {
        SslMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == value)
            .ok_or_else(|| {
                format!(
                    "sslmode must be disable, prefer, require, verify-ca or verify-full, \
                     not {value:?}"
                )
            })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The driver's mode: it asks for TLS, and gives up without it, as this says.
    fn driver(self) -> postgres::config::SslMode {
        match self {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                postgres::config::SslMode::Require
            }
        }
    }
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
        let (rest, tls) = take_tls(text);
        let ssl_mode = match tls.mode {
            Some(mode) => SslMode::parse(&mode)?,
            None => SslMode::Prefer,
        };
        let ssl_root_cert = tls.root_cert.filter(|p| !p.is_empty()).map(PathBuf::from);
        // The driver's own message may quote the text it could not parse: never echo it.
        let mut config: postgres::Config = rest
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
        config.ssl_mode(ssl_mode.driver());
        Ok(Database::Postgres(Postgres {
            config: Box::new(config),
            ssl_mode,
            ssl_root_cert,
        }))
    }
}

/// `sslmode` and `sslrootcert` as written (the last of each wins, as in libpq).
#[derive(Default)]
struct TlsWords {
    mode: Option<String>,
    root_cert: Option<String>,
}

impl TlsWords {
    /// Keeps `value` if `key` is one of ours; whether it was.
    fn take(&mut self, key: &str, value: String) -> bool {
        match key {
            "sslmode" => self.mode = Some(value),
            "sslrootcert" => self.root_cert = Some(value),
            _ => return false,
        }
        true
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query or libpq's words, for the driver,
/// which refuses the verify modes and does not know `sslrootcert`: the rest, and those two.
fn take_tls(text: &str) -> (String, TlsWords) {
    let mut tls = TlsWords::default();
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        let rest: Vec<&str> = text
            .split_whitespace()
            .filter(|word| {
                let (key, value) = word.split_once('=').unwrap_or((word, ""));
                let value = value.trim_matches('\'');
                !tls.take(key, value.to_string())
            })
            .collect();
        return (rest.join(" "), tls);
    }
    // The query starts at the first `?` after the user and password, as the driver reads it.
    let after_user = text.find('@').map_or(0, |at| at + 1);
    let Some(question) = text[after_user..].find('?').map(|q| after_user + q) else {
        return (text.to_string(), tls);
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let rest: Vec<&str> = text[question + 1..]
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            !tls.take(&decode(key), decode(value))
        })
        .collect();
    let mut url = text[..question].to_string();
    if !rest.is_empty() {
        url.push('?');
        url.push_str(&rest.join("&"));
    }
    (url, tls)
}

/// Whether `--db` names a PostgreSQL server rather than a file.
fn is_postgres(text: &str) -> bool {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return true;
    }
    // libpq's `host=… dbname=…` words: the first a key=value pair with a libpq key. The driver
    // reads the rest (quoted values included) and refuses what it does not know; a SQLite file
    // so named can still be given as `sqlite:host=…`.
    const KEYS: &[&str] = &[
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "sslmode",
        "sslrootcert",
        "options",
        "connect_timeout",
        "application_name",
        "keepalives",
        "keepalives_idle",
        "target_session_attrs",
        "channel_binding",
        "load_balance_hosts",
        "sslcert",
        "sslkey",
    ];
    text.split_once('=')
        .is_some_and(|(key, _)| KEYS.contains(&key.trim()))
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
                write!(f, "postgres://{user}{secret}{at}{}", pg.endpoint())?;
                if pg.ssl_mode != SslMode::Prefer {
                    write!(f, "?sslmode={}", pg.ssl_mode.as_str())?;
                }
                Ok(())
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
    fn libpq_words_are_read_by_the_driver_quotes_included_and_unknown_words_refused() {
        let text = "host=db.example user=sg password='two words' dbname=gateway";
        assert_eq!(server(text).config.get_password(), Some(&b"two words"[..]));
        let shown = Database::parse(text).unwrap().to_string();
        assert!(!shown.contains("two words"), "{shown}");
        // A libpq key this driver cannot honour is refused, not taken for a file name.
        let refused = Database::parse("host=db.example password=s3cret-pw sslcert=/c.pem")
            .expect_err("client certificates are not supported");
        assert!(!refused.contains("s3cret"), "{refused}");
        // A file whose name only looks like words is still SQLite with `sqlite:`.
        assert!(matches!(
            Database::parse("sqlite:host=x.db"),
            Ok(Database::Sqlite(_))
        ));
    }

    fn server(text: &str) -> Postgres {
        match Database::parse(text) {
            Ok(Database::Postgres(pg)) => pg,
            Ok(Database::Sqlite(_)) => panic!("{text} is a server"),
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn sslmode_and_sslrootcert_are_read_from_urls_and_words_and_kept_from_the_driver() {
        use postgres::config::SslMode as Driver;
        for (text, mode, driver, root) in [
            ("postgres://sg@db:5432/g", SslMode::Prefer, Driver::Prefer, None),
            (
                "postgres://sg@db/g?sslmode=disable",
                SslMode::Disable,
                Driver::Disable,
                None,
            ),
            (
                "postgresql://sg:pw@db/g?application_name=gw&sslmode=require",
                SslMode::Require,
                Driver::Require,
                None,
            ),
            (
                "postgres://sg@db/g?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem",
                SslMode::VerifyCa,
                Driver::Require,
                Some("/etc/ca dir/ca.pem"),
            ),
            (
                "postgres://sg@db/g?sslrootcert=/etc/ca.pem&application_name=gw&sslmode=verify-full",
                SslMode::VerifyFull,
                Driver::Require,
                Some("/etc/ca.pem"),
            ),
            (
                "host=db user=sg sslmode=verify-full sslrootcert='/etc/ca.pem' dbname=g",
                SslMode::VerifyFull,
                Driver::Require,
                Some("/etc/ca.pem"),
            ),
            ("host=db sslmode=prefer dbname=g", SslMode::Prefer, Driver::Prefer, None),
        ] {
            let pg = server(text);
            assert_eq!(pg.ssl_mode, mode, "{text}");
            assert_eq!(pg.config.get_ssl_mode(), driver, "{text}");
            assert_eq!(pg.ssl_root_cert, root.map(PathBuf::from), "{text}");
            assert_eq!(pg.config.get_dbname(), Some("g"), "{text}");
            if text.contains("application_name") {
                assert_eq!(pg.config.get_application_name(), Some("gw"), "{text}");
            }
        }
    }

    #[test]
    fn an_unknown_sslmode_is_refused_naming_the_modes_but_not_the_password() {
        for text in [
            "postgres://sg:s3cret-pw@db/g?sslmode=verify_full",
            "host=db password=s3cret-pw sslmode=allow",
        ] {
            let err = Database::parse(text).unwrap_err();
            assert!(
                err.contains("sslmode must be disable, prefer, require, verify-ca or verify-full"),
                "{err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn the_sslmode_is_shown_and_the_password_still_is_not() {
        let db = Database::parse(
            "postgres://sg:s3cret-pw@db:6543/g?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        for shown in [db.to_string(), format!("{db:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(
                shown.contains("postgres://sg:***@db:6543/g?sslmode=verify-full"),
                "{shown}"
            );
        }
        let plain = Database::parse("postgres://sg:s3cret-pw@db:6543/g").unwrap();
        assert_eq!(plain.to_string(), "postgres://sg:***@db:6543/g");
    }

    #[test]
    fn a_bad_url_is_refused_without_repeating_it() {
        let err = Database::parse("postgres://sg:s3cret@db.example:notaport/x").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
