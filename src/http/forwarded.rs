//! The client's address behind reverse proxies. `X-Forwarded-For` is believed only when the
//! connection comes from a proxy in `[server] trusted_proxies`, and then only as far as the
//! chain is made of trusted proxies: read from the right (the hop nearest to us), the first
//! address that is not a trusted proxy is the client. A client that writes its own header
//! through a trusted proxy gains nothing: the proxy appends the address it saw.

use std::fmt;
use std::net::IpAddr;

/// An address block, `10.0.0.0/8` or `::1/128` (a bare address is a block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    network: IpAddr,
    bits: u8,
}

impl Cidr {
    pub(crate) fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or address/prefix"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{text:?}: the prefix must be 0 to {max}")),
            },
        };
        Ok(Cidr { network, bits })
    }

    pub(crate) fn contains(&self, addr: IpAddr) -> bool {
        // An IPv4 client on an IPv6 socket arrives as ::ffff:a.b.c.d.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => prefix_eq(&net.octets(), &a.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(a)) => prefix_eq(&net.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.bits)
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[whole] & mask == b[whole] & mask
}

/// The default: only this machine's own proxies (nginx on the same host).
pub(crate) fn loopback() -> Vec<Cidr> {
    vec![
        Cidr::parse("127.0.0.0/8").expect("a valid block"),
        Cidr::parse("::1/128").expect("a valid block"),
    ]
}

/// The client's address: the peer, unless the peer is a trusted proxy; then the nearest
/// address in `X-Forwarded-For` (all its values, in order) that is not a trusted proxy. A
/// chain of trusted proxies only gives its first address; an unreadable entry ends the walk
/// at the last address believed.
pub(crate) fn client(peer: IpAddr, forwarded_for: &[&str], trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |a: IpAddr| trusted.iter().any(|c| c.contains(a));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_for
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(addr) = hop.parse::<IpAddr>() else {
            return client;
        };
        client = addr;
        if !is_trusted(addr) {
            return addr;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_contain_what_they_should() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(Cidr::parse("192.168.1.7")
            .unwrap()
            .contains(ip("192.168.1.7")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(loopback()[0].contains(ip("::ffff:127.0.0.1")), "v4-mapped");
        assert!(!Cidr::parse("10.0.0.0/8").unwrap().contains(ip("::1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "1.2.3.4/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(Cidr::parse("10.1.0.0/12")
            .unwrap()
            .contains(ip("10.15.255.255")));
        assert!(!Cidr::parse("10.1.0.0/12")
            .unwrap()
            .contains(ip("10.16.0.0")));
    }

    #[test]
    fn forwarded_for_is_believed_only_through_trusted_proxies() {
        let trusted = loopback();
        let proxy = ip("127.0.0.1");
        // No proxy: the header is the client's to write and is ignored.
        assert_eq!(
            client(ip("203.0.113.9"), &["198.51.100.1"], &trusted),
            ip("203.0.113.9")
        );
        // Through our proxy: the address it appended.
        assert_eq!(
            client(proxy, &["198.51.100.1"], &trusted),
            ip("198.51.100.1")
        );
        // A client's own header is left of what the proxy appended, so it is not believed.
        assert_eq!(
            client(proxy, &["10.9.9.9, 198.51.100.1"], &trusted),
            ip("198.51.100.1")
        );
        // Several header lines read as one list; trusted hops are skipped.
        assert_eq!(
            client(proxy, &["198.51.100.1", "127.0.0.2"], &trusted),
            ip("198.51.100.1")
        );
        // Garbage ends the walk at the last address believed.
        assert_eq!(client(proxy, &["x, 127.0.0.5"], &trusted), ip("127.0.0.5"));
        assert_eq!(client(proxy, &[], &trusted), proxy);
        // With no trusted proxies the peer is always the client.
        assert_eq!(client(proxy, &["198.51.100.1"], &[]), proxy);
    }
}
