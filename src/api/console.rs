//! The console: a few static files built into the binary (`console/`), served on the
//! connection thread under a strict Content-Security-Policy. The status page reads
//! `GET /api/status` (`status.rs`); the other pages read the API (`/api/requests`,
//! `/api/usage`, `/admin/keys`, …) like any client. No script, style or font comes from
//! elsewhere.

use std::net::IpAddr;

use super::ApiError;
use crate::http::{Request, Response};
use crate::server::State;

/// Every console response carries it: only our own files run, nothing inline, no framing.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'";

/// Where the console lives; `/` and `/console` redirect here.
pub(crate) const HOME: &str = "/console/";

/// The files, by path.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/console/",
        "text/html; charset=utf-8",
        include_str!("../../console/index.html"),
    ),
    (
        "/console/index.html",
        "text/html; charset=utf-8",
        include_str!("../../console/index.html"),
    ),
    (
        "/console/console.css",
        "text/css; charset=utf-8",
        include_str!("../../console/console.css"),
    ),
    (
        "/console/console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/console.js"),
    ),
    (
        "/console/pages.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/pages.js"),
    ),
];

/// Answers `GET /`, `/console` and `/console/…`. The files hold no data, so they need no key;
/// in development mode (no key needed anywhere) the Host must still be a local one.
pub(crate) fn serve(state: &State, request: &Request) -> Response {
    let response = if state.auth.is_open() {
        check_host(state, request).map_or_else(|e| Some(e.to_response()), |()| None)
    } else {
        None
    };
    let response = response.unwrap_or_else(|| file(&request.path));
    secured(response)
}

fn file(path: &str) -> Response {
    if path == "/" || path == "/console" {
        return Response::text(
            303,
            "text/plain; charset=utf-8",
            b"see /console/\n".to_vec(),
        )
        .with_header("location", HOME.to_string());
    }
    match FILES.iter().find(|(p, _, _)| *p == path) {
        Some((_, content_type, body)) => {
            Response::text(200, content_type, body.as_bytes().to_vec())
                .with_header("cache-control", "no-cache".to_string())
        }
        None => Response::text(
            404,
            "text/plain; charset=utf-8",
            b"no such console file\n".to_vec(),
        ),
    }
}

/// The headers every console response carries.
fn secured(response: Response) -> Response {
    response
        .with_header("content-security-policy", CSP.to_string())
        .with_header("x-content-type-options", "nosniff".to_string())
        .with_header("referrer-policy", "no-referrer".to_string())
}

/// Refuses a request whose `Host` is not this machine's, while no key is needed: a page on
/// another site could otherwise point its own name at 127.0.0.1 (DNS rebinding) and read the
/// console. Allowed: `localhost` and `*.localhost`, a loopback address, the listen address,
/// and the names of `[server] local_hosts`.
/// An HTTP/1.0 request without a Host passes: a browser always sends one, so rebinding cannot
/// leave it out.
pub(crate) fn check_host(state: &State, request: &Request) -> Result<(), ApiError> {
    let Some(host) = request.header("host") else {
        return Ok(());
    };
    if is_local_host(host, state.config.listen.ip(), &state.config.local_hosts) {
        Ok(())
    } else {
        Err(ApiError::ForeignHost {
            host: host.chars().take(100).collect(),
        })
    }
}

fn is_local_host(host: &str, listen: IpAddr, named: &[String]) -> bool {
    // Without its port: `[v6]:port`, `[v6]`, `name:port`, `v4:port`, `name`.
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, _)) => inside,
            None => return false,
        },
        None => host.split(':').next().unwrap_or(""),
    };
    let name = name.to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") || named.contains(&name) {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || (ip == listen && !listen.is_unspecified()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_hosts_pass_while_no_key_is_needed() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:80",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:9",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(is_local_host(ok, loopback, &[]), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.5:8080",
            "[::1",
            "[2001:db8::1]:80",
        ] {
            assert!(!is_local_host(bad, loopback, &[]), "{bad}");
        }
        let lan: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(is_local_host("10.0.0.5:8080", lan, &[]));
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert!(!is_local_host("0.0.0.0", any, &[]));
        // A name configured in `[server] local_hosts`, any case, with or without a port.
        let named = ["myapp.test".to_string()];
        assert!(is_local_host("MyApp.test:8080", loopback, &named));
        assert!(!is_local_host("other.test", loopback, &named));
    }

    #[test]
    fn every_file_is_served_and_nothing_else() {
        for (path, content_type, _) in FILES {
            let r = file(path);
            assert_eq!(r.status, 200, "{path}");
            assert!(r
                .headers
                .contains(&("content-type", content_type.to_string())));
        }
        assert_eq!(file("/").status, 303);
        assert_eq!(file("/console/../Cargo.toml").status, 404);
        assert_eq!(file("/console/nope.js").status, 404);
    }
}
