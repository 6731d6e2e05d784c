//! Who the client is, behind any proxies: the `X-Forwarded-*` and
//! `Forwarded` headers a request arrives with are believed only when the
//! peer that sent it is a configured trusted proxy (`trusted_proxies`).
//!
//! Used twice on the way upstream: [`Forwarding::client_ip`] is the address
//! rate limits count by, and `upstream::upstream_request_headers` keeps the
//! inbound forwarding headers only when [`Forwarding::peer_trusted`].

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The configured trusted proxies.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn new(nets: &[IpNet]) -> TrustedProxies {
        TrustedProxies {
            nets: nets.to_vec(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// What this request's forwarding headers are worth.
    pub fn assess(&self, peer: SocketAddr, headers: &HeaderMap) -> Forwarding {
        let peer_ip = canonical(peer.ip());
        if !self.contains(peer_ip) {
            return Forwarding {
                peer: peer_ip,
                peer_trusted: false,
                client_ip: peer_ip,
            };
        }
        // Rightmost address that is not a trusted proxy: everything to its
        // left was written by the client or by proxies we do not know.
        let mut client = peer_ip;
        for hop in forwarded_chain(headers).into_iter().rev() {
            match hop {
                Some(ip) => {
                    client = ip;
                    if !self.contains(ip) {
                        break;
                    }
                }
                // Garbage in the chain: the last trusted hop is all we know.
                None => break,
            }
        }
        Forwarding {
            peer: peer_ip,
            peer_trusted: true,
            client_ip: client,
        }
    }
}

/// The verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarding {
    /// The TCP peer.
    pub peer: IpAddr,
    /// Whether the peer is a trusted proxy (its forwarding headers are kept).
    pub peer_trusted: bool,
    /// The client's address: the peer, or, behind trusted proxies, the
    /// rightmost address of the chain that is not one.
    pub client_ip: IpAddr,
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, a dual-stack listener's
/// view of an IPv4 peer) as plain IPv4, so that IPv4 CIDRs match them.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The addresses of `X-Forwarded-For` (all its headers, in order), or if
/// there is none, the `for=` parameters of `Forwarded`; `None` for an entry
/// that is not an IP address (`unknown`, an obfuscated name, garbage).
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(s) => s.split(',').map(|p| parse_ip(p.trim())).collect::<Vec<_>>(),
            Err(_) => vec![None],
        })
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(s) => s
                .split(',')
                .filter_map(|element| {
                    element.split(';').find_map(|pair| {
                        let (k, v) = pair.trim().split_once('=')?;
                        k.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| parse_ip(v.trim().trim_matches('"')))
                    })
                })
                .collect::<Vec<_>>(),
            Err(_) => vec![None],
        })
        .collect()
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:5678`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

/// `for=` value for `Forwarded` (RFC 7239 §6: IPv6 quoted and bracketed).
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        TrustedProxies::new(&nets)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), 4000)
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let t = trusted(&["10.0.0.0/8"]);
        let f = t.assess(
            peer("203.0.113.9"),
            &headers(&[("x-forwarded-for", "1.1.1.1")]),
        );
        assert!(!f.peer_trusted);
        assert_eq!(f.client_ip, "203.0.113.9".parse::<IpAddr>().unwrap());
        // No trusted proxies at all: same.
        let f = TrustedProxies::default().assess(
            peer("10.0.0.1"),
            &headers(&[("x-forwarded-for", "1.1.1.1")]),
        );
        assert_eq!(f.client_ip, "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_address_is_the_client() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.1/32"]);
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-for", "10.1.2.3"),
        ]);
        let f = t.assess(peer("192.168.1.1"), &h);
        assert!(f.peer_trusted);
        // 6.6.6.6 was written by the client itself: not believed.
        assert_eq!(f.client_ip, "198.51.100.7".parse::<IpAddr>().unwrap());
        // Only trusted hops: the leftmost.
        let f = t.assess(
            peer("10.0.0.1"),
            &headers(&[("x-forwarded-for", "10.9.9.9")]),
        );
        assert_eq!(f.client_ip, "10.9.9.9".parse::<IpAddr>().unwrap());
        // No header: the proxy itself.
        let f = t.assess(peer("10.0.0.1"), &HeaderMap::new());
        assert_eq!(f.client_ip, "10.0.0.1".parse::<IpAddr>().unwrap());
        // Garbage stops the walk at the last trusted hop.
        let f = t.assess(
            peer("10.0.0.1"),
            &headers(&[("x-forwarded-for", "1.2.3.4, junk, 10.0.0.2")]),
        );
        assert_eq!(f.client_ip, "10.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_header_and_address_forms() {
        let t = trusted(&["::1/128", "127.0.0.0/8"]);
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::17]:4711\"",
        )]);
        let f = t.assess(peer("::1"), &h);
        assert_eq!(f.client_ip, "2001:db8::17".parse::<IpAddr>().unwrap());
        // An IPv4-mapped peer matches an IPv4 CIDR.
        let f = t.assess(
            peer("::ffff:127.0.0.1"),
            &headers(&[("x-forwarded-for", "5.6.7.8:99")]),
        );
        assert!(f.peer_trusted);
        assert_eq!(f.client_ip, "5.6.7.8".parse::<IpAddr>().unwrap());
        assert_eq!(
            forwarded_for("2001:db8::1".parse().unwrap()),
            "for=\"[2001:db8::1]\""
        );
    }
}
