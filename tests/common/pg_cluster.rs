//! A PostgreSQL cluster of one test's own, for tests that must stop the database under a
//! running syncgate and start it again (the shared cluster of `scripts/test` must stay up for
//! everyone else), or for tests of TLS (a cluster that takes only TLS, with a CA of its own).
//! Trust authentication on 127.0.0.1 and a port of its own; removed on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::machine::{find_program, require};
use super::{free_port, unique};

pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

/// The newest PostgreSQL server programs under /usr/lib/postgresql.
fn server_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl PgCluster {
    /// Makes and starts the cluster, or `None` when the machine has no PostgreSQL server and
    /// this run may skip (see `require`).
    pub fn start() -> Option<PgCluster> {
        let cluster = PgCluster::init()?;
        cluster.start_again();
        Some(cluster)
    }

    /// A cluster that takes TLS connections only (`hostssl`; a plain one is rejected), with a
    /// certificate for `localhost` and `127.0.0.1` signed by a CA of its own (`ca_pem`). It
    /// listens on 127.0.0.2 too, a name the certificate does not carry. `other_ca_pem` is a
    /// second CA, which signed nothing the server shows. `None` when this run may skip.
    pub fn start_tls() -> Option<PgCluster> {
        let openssl = require(
            "openssl, to make the test certificates",
            "openssl",
            find_program("openssl", &["/usr/bin/openssl"]),
        )?;
        let cluster = PgCluster::init()?;
        cluster.make_certificates(&openssl.display().to_string());
        let dir = cluster.dir_str();
        cluster.append_conf(&format!(
            "listen_addresses = '127.0.0.1,127.0.0.2'\nssl = on\n\
             ssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n"
        ));
        fs::write(
            cluster.dir.join("data/pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.0/8 trust\n\
             hostnossl all all 127.0.0.0/8 reject\n",
        )
        .unwrap();
        cluster.start_again();
        Some(cluster)
    }

    /// Made and configured, not started.
    fn init() -> Option<PgCluster> {
        let bin = require("PostgreSQL's server programs", "postgresql", server_bin())?;
        let dir = PathBuf::from("/tmp").join(unique("sg-pgc"));
        fs::create_dir_all(&dir).unwrap();
        let cluster = PgCluster {
            dir,
            bin,
            port: free_port(),
        };
        if is_root() {
            // initdb refuses to run as root: the cluster belongs to Debian's postgres user.
            cluster.run("chown", &["-R", "postgres:", &cluster.dir_str()], false);
        }
        let data = cluster.data();
        let initdb = cluster.bin.join("initdb").display().to_string();
        cluster.run(
            &initdb,
            &["-D", &data, "-U", "syncgate", "--auth=trust", "--no-sync"],
            true,
        );
        cluster.append_conf(&format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\n",
            cluster.port,
            cluster.dir_str()
        ));
        Some(cluster)
    }

    /// `postgres://syncgate@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_at("127.0.0.1")
    }

    /// `postgres://syncgate@HOST:PORT/postgres`.
    pub fn url_at(&self, host: &str) -> String {
        format!("postgres://syncgate@{host}:{}/postgres", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA that signed a TLS cluster's certificate (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA of a TLS cluster's that signed nothing the server shows (PEM).
    pub fn other_ca_pem(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// The CA, the other CA, and the server's key and certificate for `localhost` and
    /// `127.0.0.1`, in the cluster's directory, made as the postgres user when root: the
    /// server refuses a key that is not its own or that others may read.
    fn make_certificates(&self, openssl: &str) {
        let dir = self.dir_str();
        // Each command's words: the paths hold no spaces.
        let run = |command: String| {
            let args: Vec<&str> = command.split_whitespace().collect();
            self.run(openssl, &args, true);
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        for ca in ["ca", "other-ca"] {
            run(format!(
                "req -x509 -days 2 -subj /CN=syncgate-test-{ca} {ec} -keyout {dir}/{ca}.key \
                 -out {dir}/{ca}.pem -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign"
            ));
        }
        run(format!(
            "req -subj /CN=localhost {ec} -keyout {dir}/server.key -out {dir}/server.csr"
        ));
        fs::write(
            self.dir.join("server.ext"),
            "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
             keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        run(format!(
            "x509 -req -days 2 -in {dir}/server.csr -CA {dir}/ca.pem -CAkey {dir}/ca.key \
             -CAcreateserial -extfile {dir}/server.ext -out {dir}/server.crt"
        ));
        let key = self.dir.join("server.key");
        fs::set_permissions(key, fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn append_conf(&self, conf: &str) {
        let path = self.dir.join("data/postgresql.conf");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(conf);
        fs::write(&path, text).unwrap();
    }

    /// Stops the server at once, as a crash or a cut cable would (`-m immediate`).
    pub fn stop(&self) {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        self.run(
            &pg_ctl,
            &["stop", "-D", &self.data(), "-m", "immediate", "-w"],
            true,
        );
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            &pg_ctl,
            &["start", "-D", &self.data(), "-l", &log, "-w", "-t", "30"],
            true,
        );
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn dir_str(&self) -> String {
        self.dir.display().to_string()
    }

    /// Runs a program to its end, as the postgres user when root and `as_postgres`; panics
    /// with its output if it fails.
    fn run(&self, program: &str, args: &[&str], as_postgres: bool) {
        let mut cmd = if as_postgres && is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let data = self.data();
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &pg_ctl]);
            c
        } else {
            Command::new(&pg_ctl)
        };
        let _ = cmd
            .args(["stop", "-D", &data, "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
