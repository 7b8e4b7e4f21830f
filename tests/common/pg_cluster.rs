//! A PostgreSQL cluster of one test's own, for tests that must stop the database under a
//! running syncgate and start it again (the shared cluster of `scripts/test` must stay up for
//! everyone else). Trust authentication on 127.0.0.1 and a port of its own; removed on drop.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::machine::require;
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
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\n",
            cluster.port,
            cluster.dir_str()
        );
        let path = cluster.dir.join("data/postgresql.conf");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        fs::write(&path, text).unwrap();
        cluster.start_again();
        Some(cluster)
    }

    /// `postgres://syncgate@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://syncgate@127.0.0.1:{}/postgres", self.port)
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
