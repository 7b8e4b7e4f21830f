//! Name resolution for provider calls, without a thread per call.
//!
//! ureq resolves the host on every call, pooled connection or not, and when the call has a
//! timeout (ours always do) its default resolver spawns a thread to run the lookup under it.
//! Under load that was a thread created and torn down per request (perf, 64 clients:
//! `thread_start`, `mprotect` and `madvise` on the gateway's hot path). This resolver answers
//! an address literal (`127.0.0.1`, `[::1]`) directly and keeps a name's addresses for
//! [`TTL`]; only a miss goes to ureq's resolver, under the call's timeout as before.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;
use ureq::Error;

/// How long a name's addresses are reused before they are looked up again. Short enough that
/// a provider moving its addresses is followed within a minute.
pub(crate) const TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(crate) struct CachingResolver {
    lookup: DefaultResolver,
    names: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, Error> {
        let (Some(host), Some(port)) = (uri.host(), port_of(uri)) else {
            return self.lookup.resolve(uri, config, timeout);
        };
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let mut addrs = self.empty();
            addrs.push(SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        let key = format!("{host}:{port}");
        let now = Instant::now();
        {
            let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((at, addrs)) = names.get(&key) {
                if now.duration_since(*at) < TTL {
                    return Ok(addrs.clone());
                }
            }
        }
        // A miss is looked up outside the lock, so one slow lookup holds up no other name.
        let addrs = self.lookup.resolve(uri, config, timeout)?;
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (now, addrs.clone()));
        Ok(addrs)
    }
}

/// The port the call goes to: the URI's own, else the scheme's.
fn port_of(uri: &Uri) -> Option<u16> {
    uri.port_u16().or(match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn five_seconds() -> NextTimeout {
        NextTimeout {
            after: Duration::from_secs(5).into(),
            reason: ureq::Timeout::Resolve,
            ..NextTimeout::default()
        }
    }

    fn resolve(uri: &str) -> Vec<SocketAddr> {
        let resolver = CachingResolver::default();
        let config = Config::default();
        let uri: Uri = uri.parse().unwrap();
        let timeout = five_seconds();
        resolver
            .resolve(&uri, &config, timeout)
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn address_literals_resolve_to_themselves_with_the_right_port() {
        assert_eq!(
            resolve("http://127.0.0.1:9090/v1/chat"),
            vec!["127.0.0.1:9090".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("https://[::1]/v1"),
            vec!["[::1]:443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("http://10.1.2.3/v1"),
            vec!["10.1.2.3:80".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn names_are_looked_up_and_kept() {
        let resolver = CachingResolver::default();
        let config = Config::default();
        let uri: Uri = "http://localhost:9090/".parse().unwrap();
        let timeout = five_seconds();
        let first = resolver.resolve(&uri, &config, timeout).unwrap();
        assert!(first
            .iter()
            .all(|a| a.port() == 9090 && a.ip().is_loopback()));
        assert_eq!(resolver.names.lock().unwrap().len(), 1);
        let again = resolver.resolve(&uri, &config, timeout).unwrap();
        assert_eq!(
            first.iter().collect::<Vec<_>>(),
            again.iter().collect::<Vec<_>>()
        );
    }
}
