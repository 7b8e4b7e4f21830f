//! Several syncgate instances on one PostgreSQL database, and nginx in front of one or more
//! of them with the shipped `deploy/nginx/syncgate.conf` (issue 15). A `Fleet` keeps each
//! instance's port, so an instance stopped (SIGTERM or kill -9) starts again where nginx and
//! the clients expect it; `Nginx` runs Debian's nginx in the foreground from a temporary prefix.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::machine::{find_program, require, terminate};
use super::{free_port, get, poll_until, unique, Server, TempConfig};

/// The shipped site config, included in the `http { }` block.
pub const SHIPPED_NGINX: &str = include_str!("../../deploy/nginx/syncgate.conf");

/// How long an instance may take to answer `/readyz` with 200 after its `listening on` line.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `server` answers `/readyz` with 200: on PostgreSQL that includes its lease and
/// all of the shared limiter's connections open, so a burst right after start finds them.
pub fn wait_ready(server: &Server) {
    let ready = poll_until(READY_DEADLINE, Duration::from_millis(20), || {
        get(server.addr, "/readyz").status == 200
    });
    assert!(
        ready,
        "{} never became ready:\n{}",
        server.addr,
        server.log()
    );
}

/// N `syncgate serve` processes on one database, each on a port of its own, with the same
/// config file. Killed and reaped on drop (each `Server` does it).
pub struct Fleet {
    pub instances: Vec<Option<Server>>,
    ports: Vec<u16>,
    db_url: String,
    config: TempConfig,
}

impl Fleet {
    /// Starts `n` instances on the database `db_url` with `toml` as their config, one after
    /// another (the first migrates the database), each ready when this returns.
    pub fn start(n: usize, db_url: &str, toml: &str) -> Fleet {
        let mut fleet = Fleet {
            instances: (0..n).map(|_| None).collect(),
            ports: (0..n).map(|_| free_port()).collect(),
            db_url: db_url.to_string(),
            config: TempConfig::new(toml),
        };
        for i in 0..n {
            fleet.start_instance(i);
        }
        fleet
    }

    /// Instance `i`, which must be running.
    pub fn at(&self, i: usize) -> &Server {
        self.instances[i]
            .as_ref()
            .unwrap_or_else(|| panic!("instance {i} is not running"))
    }

    pub fn at_mut(&mut self, i: usize) -> &mut Server {
        self.instances[i]
            .as_mut()
            .unwrap_or_else(|| panic!("instance {i} is not running"))
    }

    /// Where instance `i` listens (whether it runs now or not).
    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[i]))
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        (0..self.ports.len()).map(|i| self.addr(i)).collect()
    }

    /// Starts instance `i` on its port and waits until `/readyz` answers 200.
    pub fn start_instance(&mut self, i: usize) {
        assert!(self.instances[i].is_none(), "instance {i} runs already");
        let listen = self.addr(i).to_string();
        let config = self.config.path_str();
        let args = [
            "serve",
            "--listen",
            &listen,
            "--config",
            &config,
            "--db",
            &self.db_url,
        ];
        let server = Server::start_command(&args, &[], None);
        wait_ready(&server);
        self.instances[i] = Some(server);
    }

    /// Kills instance `i` with SIGKILL and reaps it; its log is kept in the returned server.
    pub fn kill(&mut self, i: usize) -> Server {
        let mut server = self.instances[i].take().expect("a running instance");
        server.signal(libc::SIGKILL);
        server.wait_exit(Duration::from_secs(10));
        server
    }

    /// Sends SIGTERM to instance `i` and waits for it to drain and exit; returns it (exited).
    pub fn stop(&mut self, i: usize, within: Duration) -> Server {
        let mut server = self.instances[i].take().expect("a running instance");
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(within);
        assert!(
            status.is_some_and(|s| s.success()),
            "instance {i} did not exit cleanly within {within:?} ({status:?}):\n{}",
            server.log()
        );
        server
    }
}

/// Debian's nginx, when the machine has it (see `require`).
pub fn nginx_program() -> Option<PathBuf> {
    let found = find_program("nginx", &["/usr/sbin/nginx", "/usr/local/sbin/nginx"]);
    require("nginx", "nginx", found)
}

/// The shipped site config with its upstream servers replaced by `backends` (each with the
/// shipped server line's parameters), listening on `port`, with `extra` substitutions
/// (`(from, to)`, each of which must be found).
pub fn render_site(backends: &[SocketAddr], port: u16, extra: &[(&str, &str)]) -> String {
    let mut servers = SHIPPED_NGINX
        .lines()
        .filter(|l| l.trim_start().starts_with("server 127.0.0.1:"));
    let first = servers.next().expect("the shipped upstream lists a server");
    let params = first
        .trim_start()
        .split_once(';')
        .map(|(line, _)| {
            line.split_whitespace()
                .skip(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let ours: String = backends
        .iter()
        .map(|b| format!("    server {b} {params};\n"))
        .collect();
    let mut site = String::new();
    let mut placed = false;
    for line in SHIPPED_NGINX.lines() {
        if line.trim_start().starts_with("server 127.0.0.1:") {
            if !placed {
                site.push_str(&ours);
                placed = true;
            }
            continue;
        }
        site.push_str(line);
        site.push('\n');
    }
    let listen = "listen 80;";
    assert!(
        site.contains(listen),
        "the shipped config no longer listens on 80"
    );
    site = site.replace(listen, &format!("listen 127.0.0.1:{port};"));
    for (from, to) in extra {
        assert!(site.contains(from), "the shipped config has no {from:?}");
        site = site.replace(from, to);
    }
    site
}

/// A running nginx in front of syncgate; stopped (master and workers) on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    prefix: PathBuf,
}

impl Nginx {
    /// nginx with the shipped config in front of `backends`.
    pub fn start(nginx: &Path, backends: &[SocketAddr]) -> Nginx {
        Nginx::start_with(nginx, backends, &[])
    }

    /// The same, with `extra` substitutions in the shipped config.
    pub fn start_with(nginx: &Path, backends: &[SocketAddr], extra: &[(&str, &str)]) -> Nginx {
        let prefix = std::env::temp_dir().join(unique("syncgate-nginx"));
        for dir in ["", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            let path = prefix.join(dir);
            fs::create_dir_all(&path).unwrap();
            // nginx's workers run as an unprivileged user when the master is root.
            set_mode(&path, 0o777);
        }
        let port = free_port();
        fs::write(
            prefix.join("syncgate.conf"),
            render_site(backends, port, extra),
        )
        .unwrap();
        let p = prefix.display();
        let main = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {p}/nginx.pid;\n\
             error_log {p}/error.log info;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log {p}/access.log;\n  client_body_temp_path {p}/client_body;\n\
             proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n\
             uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
             include {p}/syncgate.conf;\n}}\n"
        );
        fs::write(prefix.join("nginx.conf"), main).unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", nginx.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut nginx = Nginx {
            addr,
            child,
            prefix,
        };
        let ready = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            TcpStream::connect(addr).is_ok()
        });
        if !ready {
            let log = nginx.error_log();
            let _ = nginx.child.kill();
            panic!("nginx did not listen on {addr}:\n{log}");
        }
        nginx
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- nginx error log ---\n{}", self.error_log());
        }
        // SIGTERM to the master: it stops its workers and exits (a SIGKILL would orphan them).
        terminate(&mut self.child, Duration::from_secs(5));
        let _ = fs::remove_dir_all(&self.prefix);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Polls until `f` holds or `within` passes; how long it took, or `None`.
pub fn time_until(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    poll_until(within, Duration::from_millis(20), &mut f).then(|| started.elapsed())
}
