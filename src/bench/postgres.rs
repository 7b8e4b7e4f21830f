//! The PostgreSQL server `--db` names, as the bench uses it: scratch databases, one for each
//! store the bench opens and each gateway it starts there, made empty and dropped after, so no
//! run sees another's rows; and the `--db` a gateway is started with to use one.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use anyhow::Context;

use crate::database::{Database, Postgres};
use crate::store;

/// The server's version and where it is ("15.18 at 127.0.0.1:5432"), asked once before any
/// scenario runs, so a server the bench cannot reach fails the run at once.
pub(crate) fn describe(server: &Postgres) -> anyhow::Result<String> {
    let mut client = store::postgres::connect(server)?;
    let row = client
        .query_one("SHOW server_version", &[])
        .with_context(|| format!("cannot ask {} for its version", server.endpoint()))?;
    let version: String = row.get(0);
    // "15.18 (Debian 15.18-0+deb12u1)": the number says enough.
    let version = version.split_whitespace().next().unwrap_or("?").to_string();
    // The server, not the database named: the bench works in databases of its own.
    let endpoint = server.endpoint();
    let host_port = endpoint.rsplit_once('/').map_or(&*endpoint, |(hp, _)| hp);
    Ok(format!("{version} at {host_port}"))
}

/// An empty database on the server, dropped (with any sessions still on it) on drop.
pub(crate) struct ScratchDatabase {
    server: Postgres,
    name: String,
    database: Postgres,
}

impl ScratchDatabase {
    /// Makes `syncgate_bench_<pid>_<tag>`, dropping any left over with that name first.
    pub(crate) fn create(server: &Postgres, tag: &str) -> anyhow::Result<ScratchDatabase> {
        let name = format!("syncgate_bench_{}_{tag}", std::process::id());
        let mut admin = store::postgres::connect(server)?;
        // Two statements, not one batch: neither may run inside a transaction.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .and_then(|()| admin.batch_execute(&format!("CREATE DATABASE {name}")))
            .with_context(|| {
                format!(
                    "cannot make the scratch database {name} at {} (the role needs CREATEDB)",
                    server.endpoint()
                )
            })?;
        let mut database = server.clone();
        database.config.dbname(&name);
        Ok(ScratchDatabase {
            server: server.clone(),
            name,
            database,
        })
    }

    /// The database, to open a store on in this process.
    pub(crate) fn database(&self) -> Database {
        Database::Postgres(self.database.clone())
    }

    /// What a gateway needs to use the database: the `--db` URL, which holds no password (a
    /// command line is anyone's to read), and the environment with the password, if any.
    pub(crate) fn serve_args(&self) -> (String, Vec<(String, OsString)>) {
        let env = self
            .database
            .config
            .get_password()
            .map(|p| {
                (
                    "PGPASSWORD".to_string(),
                    OsString::from(std::ffi::OsStr::from_bytes(p)),
                )
            })
            .into_iter()
            .collect();
        (url_without_password(&self.database), env)
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = store::postgres::connect(&self.server) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// `postgres://?host=…&port=…&user=…&dbname=…&options=…&connect_timeout=…&sslmode=…`: every
/// setting the bench's own connections use but the password, each as a query parameter so that
/// a socket directory or an option with spaces needs nothing but percent-encoding.
fn url_without_password(database: &Postgres) -> String {
    let config = &database.config;
    let mut params: Vec<(&str, Vec<u8>)> = Vec::new();
    if let Some(host) = config.get_hosts().first() {
        let host = match host {
            postgres::config::Host::Tcp(name) => name.as_bytes().to_vec(),
            postgres::config::Host::Unix(dir) => dir.as_os_str().as_bytes().to_vec(),
        };
        params.push(("host", host));
    }
    if let Some(port) = config.get_ports().first() {
        params.push(("port", port.to_string().into_bytes()));
    }
    if let Some(user) = config.get_user() {
        params.push(("user", user.as_bytes().to_vec()));
    }
    if let Some(dbname) = config.get_dbname() {
        params.push(("dbname", dbname.as_bytes().to_vec()));
    }
    if let Some(options) = config.get_options() {
        params.push(("options", options.as_bytes().to_vec()));
    }
    if let Some(timeout) = config.get_connect_timeout() {
        // Whole seconds, at least one: 0 would mean none.
        params.push((
            "connect_timeout",
            timeout.as_secs().max(1).to_string().into_bytes(),
        ));
    }
    params.push(("sslmode", database.ssl_mode.as_str().as_bytes().to_vec()));
    if let Some(root) = &database.ssl_root_cert {
        params.push(("sslrootcert", root.as_os_str().as_bytes().to_vec()));
    }
    let query: Vec<String> = params
        .iter()
        .map(|(key, value)| format!("{key}={}", percent_encode(value)))
        .collect();
    format!("postgres://?{}", query.join("&"))
}

/// Every byte but RFC 3986's unreserved characters as `%XX`.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn postgres(text: &str) -> Postgres {
        match Database::parse(text) {
            Ok(Database::Postgres(pg)) => pg,
            _ => panic!("{text} is not a PostgreSQL target"),
        }
    }

    #[test]
    fn the_gateway_url_keeps_every_setting_but_the_password() {
        let pg = postgres(
            "postgres://sg:s%40cret@db.example:5433/postgres?options=-c%20x%3D1\
             &sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem",
        );
        let mut scratch = pg.clone();
        scratch.config.dbname("syncgate_bench_1_2");
        let url = url_without_password(&scratch);
        assert!(!url.contains("cret"), "{url}");
        let back = postgres(&url);
        assert_eq!(back.config.get_user(), Some("sg"));
        assert_eq!(back.config.get_ports(), &[5433]);
        assert_eq!(back.config.get_dbname(), Some("syncgate_bench_1_2"));
        assert_eq!(back.config.get_options(), Some("-c x=1"));
        assert_eq!(
            back.config.get_hosts(),
            &[postgres::config::Host::Tcp("db.example".into())]
        );
        assert_eq!(
            back.config.get_connect_timeout(),
            pg.config.get_connect_timeout()
        );
        assert_eq!(back.ssl_mode, crate::database::SslMode::VerifyFull);
        assert_eq!(back.ssl_root_cert, Some("/etc/ssl/ca.pem".into()));
    }

    #[test]
    fn a_socket_directory_survives_the_url() {
        let pg = postgres("host=/run/postgresql user=sg dbname=x");
        let back = postgres(&url_without_password(&pg));
        assert_eq!(
            back.config.get_hosts(),
            &[postgres::config::Host::Unix("/run/postgresql".into())]
        );
    }
}
