//! Where `http.request` may connect (SPEC §15, §12.13): `WORKER_HTTP_DENY_NETS`,
//! `WORKER_HTTP_ALLOW_NETS` and the worker's own listening sockets, checked on
//! the resolved address of every hop before any connection is made.
//!
//! The check runs in the HTTP block's resolver, so the address checked is
//! the address ureq connects to (no second lookup an attacker's DNS could
//! answer differently). Host names that are really IPv4 numbers in the
//! forms `inet_aton` accepts (`2130706433`, `127.1`, `0x7f.1`, `0177.0.0.1`)
//! are read as the address they name before anything else, so they cannot
//! slip past a deny list written for `127.0.0.0/8`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::RwLock;

/// An IP network in CIDR notation (`10.0.0.0/8`, `fe80::/10`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a full-length prefix).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has a prefix length outside 0..={max}"))?,
        };
        Ok(Cidr {
            addr: addr.to_canonical(),
            prefix: if addr.to_canonical().is_ipv4() && max == 128 {
                prefix.saturating_sub(96)
            } else {
                prefix
            },
        })
    }

    /// Parses a comma-separated list; empty items are skipped.
    pub fn parse_list(s: &str) -> Result<Vec<Cidr>, String> {
        s.split(',')
            .filter(|i| !i.trim().is_empty())
            .map(Cidr::parse)
            .collect()
    }

    /// True if `ip` (IPv4-mapped IPv6 read as IPv4) lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let bits = usize::from(prefix);
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[whole] & mask == b[whole] & mask
}

/// Reads an IPv4 address in any form `inet_aton(3)` accepts: one to four
/// parts, each decimal, octal (leading `0`) or hex (`0x`); the last part
/// fills the remaining bytes (`127.1` is 127.0.0.1, `2130706433` too).
pub fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or(p.strip_prefix("0X")) {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let n = if digits.is_empty() {
            0
        } else {
            u32::from_str_radix(digits, radix).ok()?
        };
        if !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        nums.push(n);
    }
    let (last, head) = nums.split_last()?;
    if head.iter().any(|n| *n > 255) {
        return None;
    }
    let room = 8 * (4 - head.len() as u32);
    if room < 32 && *last >= 1 << room {
        return None;
    }
    let mut v: u32 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= n << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(v | last))
}

/// Why a hop may not be made (`PERMISSION_DENIED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressDenied(pub String);

impl fmt::Display for EgressDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EgressDenied {}

/// The egress rules of the HTTP block.
#[derive(Debug, Default)]
pub struct EgressPolicy {
    deny: Vec<Cidr>,
    allow: Option<Vec<Cidr>>,
    /// The worker's own listening sockets, added as the ports bind.
    own: RwLock<Vec<SocketAddr>>,
}

impl EgressPolicy {
    /// A policy from the two settings.
    pub fn new(deny: Vec<Cidr>, allow: Option<Vec<Cidr>>) -> EgressPolicy {
        EgressPolicy {
            deny,
            allow,
            own: RwLock::new(Vec::new()),
        }
    }

    /// Denies `addr` (a bound listener of this worker) from now on; an
    /// unspecified address (`0.0.0.0`, `::`) covers every local address on its port.
    pub fn deny_own_listener(&self, addr: SocketAddr) {
        let mut own = self.own.write().unwrap_or_else(|p| p.into_inner());
        own.push(SocketAddr::new(addr.ip().to_canonical(), addr.port()));
    }

    /// `Ok` if a connection to `addr` is allowed.
    pub fn check(&self, addr: SocketAddr) -> Result<(), EgressDenied> {
        let ip = addr.ip().to_canonical();
        if let Some(net) = self.deny.iter().find(|n| n.contains(ip)) {
            return Err(EgressDenied(format!(
                "{ip} is in WORKER_HTTP_DENY_NETS ({net})"
            )));
        }
        if let Some(allow) = &self.allow {
            if !allow.iter().any(|n| n.contains(ip)) {
                return Err(EgressDenied(format!(
                    "{ip} is not in WORKER_HTTP_ALLOW_NETS"
                )));
            }
        }
        let own = self.own.read().unwrap_or_else(|p| p.into_inner());
        if own
            .iter()
            .any(|l| l.port() == addr.port() && reaches(l.ip(), ip))
        {
            return Err(EgressDenied(format!(
                "{} is one of the worker's own listening sockets",
                SocketAddr::new(ip, addr.port())
            )));
        }
        Ok(())
    }
}

/// True if a connection to `target` could reach a socket bound to `listener`
/// (same port assumed).
fn reaches(listener: IpAddr, target: IpAddr) -> bool {
    // Linux connects 0.0.0.0 / :: to the local host.
    if target == listener || target.is_unspecified() {
        return true;
    }
    if listener.is_unspecified() {
        return is_local(target);
    }
    false
}

/// True if `ip` is an address of this host: loopback, or one a socket can
/// bind to (the kernel refuses to bind a foreign address). Only asked when
/// the port is one of the worker's own, so the syscall is rare.
fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    if let IpAddr::V6(v6) = ip {
        // Link-local needs a scope to bind; treat it as local to be safe.
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return true;
        }
    }
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V6_LOOPBACK: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

    #[test]
    fn cidrs_parse_and_match() {
        let c = |s: &str| Cidr::parse(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("169.254.0.0/16").contains(ip("169.254.169.254")));
        assert!(!c("169.254.0.0/16").contains(ip("169.255.0.1")));
        assert!(c("169.254.0.0/16").contains(ip("::ffff:169.254.1.1")));
        assert!(c("fe80::/10").contains(ip("febf::1")));
        assert!(!c("fe80::/10").contains(ip("fec0::1")));
        assert!(c("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!c("0.0.0.0/0").contains(V6_LOOPBACK));
        assert!(c("::ffff:10.0.0.0/104").contains(ip("10.1.2.3")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
        assert_eq!(Cidr::parse_list(" 10.0.0.0/8, ,::1 ").unwrap().len(), 2);
    }

    #[test]
    fn loose_ipv4_forms() {
        let p = |s: &str| parse_ipv4_loose(s);
        let lo = Some(Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(p("2130706433"), lo);
        assert_eq!(p("127.1"), lo);
        assert_eq!(p("127.0.1"), lo);
        assert_eq!(p("0x7f.1"), lo);
        assert_eq!(p("0177.0.0.1"), lo);
        assert_eq!(p("0x7f000001"), lo);
        assert_eq!(p("169.254.43518"), Some(Ipv4Addr::new(169, 254, 169, 254)));
        assert_eq!(p("4294967296"), None);
        assert_eq!(p("256.1"), None);
        assert_eq!(p("1.2.3.4.5"), None);
        assert_eq!(p("08.1"), None);
        assert_eq!(p("example.com"), None);
        assert_eq!(p("1e100"), None);
        assert_eq!(p(""), None);
    }

    #[test]
    fn own_listeners_are_denied_including_wildcard_binds() {
        let policy = EgressPolicy::new(vec![], None);
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        policy.deny_own_listener(a("127.0.0.1:4001"));
        policy.deny_own_listener(a("0.0.0.0:4002"));
        assert!(policy.check(a("127.0.0.1:4001")).is_err());
        assert!(policy.check(a("0.0.0.0:4001")).is_err());
        assert!(policy.check(a("127.0.0.2:4001")).is_ok());
        assert!(policy.check(a("127.0.0.1:4003")).is_ok());
        assert!(policy.check(a("127.0.0.9:4002")).is_err());
        assert!(policy.check(a("[::ffff:127.0.0.1]:4002")).is_err());
        assert!(policy.check(SocketAddr::new(V6_LOOPBACK, 4002)).is_err());
    }

    #[test]
    fn deny_wins_over_allow() {
        let l = |s: &str| Cidr::parse_list(s).unwrap();
        let policy = EgressPolicy::new(l("127.0.0.2/32"), Some(l("127.0.0.0/8")));
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(policy.check(a("127.0.0.1:80")).is_ok());
        assert!(policy.check(a("127.0.0.2:80")).is_err());
        assert!(policy.check(a("[::1]:80")).is_err());
    }
}
