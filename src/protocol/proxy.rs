//! The PROXY protocol header (versions 1 and 2, as HAProxy defines them) that a load
//! balancer sends before anything else, naming the client it is relaying.
//!
//! [`parse`] is a pure function over the bytes received so far. It never asks for more
//! than the header can still hold ([`Parsed::NeedMore`] gives a count that cannot reach
//! past the header's end), so a reader that reads exactly that many bytes each time stops
//! at the header's last byte, and what follows (the client's TLS handshake) stays in the
//! socket. The header is bounded: at most [`V1_MAX_LEN`] bytes for version 1 and
//! [`V2_MAX_LEN`] for version 2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest version 1 header, CRLF included (the specification's limit).
pub const V1_MAX_LEN: usize = 107;

/// The longest version 2 header accepted, fixed part included (HAProxy's own limit: the
/// 16-byte fixed part and 520 bytes of addresses and TLVs).
pub const V2_MAX_LEN: usize = 536;

/// The version 2 signature: the first 12 bytes of every version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

const V1_PREFIX: &[u8] = b"PROXY ";

/// The shortest header of either version: `PROXY UNKNOWN\r\n`.
const MIN_LEN: usize = 15;

const V2_FIXED_LEN: usize = 16;

/// The outcome of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far are a valid beginning: at least this many more are needed (never
    /// more than the header still holds).
    NeedMore(usize),
    /// A complete header.
    Header(Header),
    /// Not a valid header; the connection must be closed.
    Invalid(Invalid),
}

/// Which version of the protocol a header used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text format (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary format.
    V2,
}

/// A complete header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The version used.
    pub version: Version,
    /// The header's length in bytes: what the reader consumed.
    pub len: usize,
    /// What the balancer says about the connection.
    pub command: Command,
}

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The balancer's own connection (a health check): version 2 `LOCAL`, or version 1
    /// `UNKNOWN`. No client is relayed.
    Local,
    /// A relayed TCP connection.
    Proxy {
        /// The client's address and port.
        source: SocketAddr,
        /// The address and port the client connected to on the balancer.
        destination: SocketAddr,
    },
}

/// Why bytes are not a valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Neither signature: not a PROXY protocol header at all (e.g. a TLS hello).
    #[error("no PROXY protocol signature")]
    Signature,
    /// A version 1 header without CRLF within its 107 bytes.
    #[error("version 1 header longer than {V1_MAX_LEN} bytes")]
    V1TooLong,
    /// A version 1 header that does not follow the syntax.
    #[error("malformed version 1 header: {0}")]
    V1Syntax(&'static str),
    /// A version 2 header with a version other than 2.
    #[error("version 2 signature with protocol version {0}")]
    V2Version(u8),
    /// A version 2 header with a command other than `LOCAL` or `PROXY`.
    #[error("version 2 header with unknown command {0}")]
    V2Command(u8),
    /// A version 2 `PROXY` header for something other than TCP over IPv4 or IPv6.
    #[error("version 2 header for address family and transport 0x{0:02x}; only TCP over IPv4 or IPv6 is accepted")]
    Family(u8),
    /// A version 2 header over [`V2_MAX_LEN`] bytes.
    #[error("version 2 header of {0} bytes, over the {V2_MAX_LEN}-byte limit")]
    V2TooLong(usize),
    /// A version 2 header whose address block is too short for its family.
    #[error("version 2 address block of {len} bytes, shorter than the {need} bytes its family needs")]
    V2Short {
        /// The length the header gives.
        len: usize,
        /// The length of the family's addresses and ports.
        need: usize,
    },
}

/// Parses the PROXY header at the start of `input`; bytes after a complete header are
/// ignored (see [`Header::len`]).
pub fn parse(input: &[u8]) -> Parsed {
    match input.first() {
        None => Parsed::NeedMore(MIN_LEN),
        Some(b'P') => parse_v1(input),
        Some(b'\r') => parse_v2(input),
        Some(_) => Parsed::Invalid(Invalid::Signature),
    }
}

fn parse_v1(input: &[u8]) -> Parsed {
    let known = input.len().min(V1_PREFIX.len());
    if input[..known] != V1_PREFIX[..known] {
        return Parsed::Invalid(Invalid::Signature);
    }
    let window = &input[..input.len().min(V1_MAX_LEN)];
    let lf = window.iter().position(|&b| b == b'\n');
    // The bytes before LF are checked the same way whether LF has arrived or not, so the
    // answer never changes as more bytes come.
    let scanned = &window[..lf.unwrap_or(window.len())];
    if let Some(bad) = scanned.iter().enumerate().find_map(|(i, &b)| bad_v1_byte(b, i + 1 == scanned.len())) {
        return Parsed::Invalid(bad);
    }
    let Some(lf) = lf else {
        if input.len() >= V1_MAX_LEN {
            return Parsed::Invalid(Invalid::V1TooLong);
        }
        return Parsed::NeedMore(MIN_LEN.saturating_sub(input.len()).max(1));
    };
    if lf == 0 || input[lf - 1] != b'\r' {
        return Parsed::Invalid(Invalid::V1Syntax("line not ended by CRLF"));
    }
    let line = &input[..lf - 1];
    // Only printable ASCII is left, so the line is UTF-8.
    let Ok(text) = std::str::from_utf8(line.get(V1_PREFIX.len()..).unwrap_or_default()) else {
        return Parsed::Invalid(Invalid::V1Syntax("not ASCII"));
    };
    match v1_command(text) {
        Ok(command) => Parsed::Header(Header { version: Version::V1, len: lf + 1, command }),
        Err(invalid) => Parsed::Invalid(invalid),
    }
}

/// Why `b` cannot be in a version 1 line; a CR is allowed only as the last byte so far.
fn bad_v1_byte(b: u8, last: bool) -> Option<Invalid> {
    match b {
        b' '..=b'~' => None,
        b'\r' if last => None,
        b'\r' => Some(Invalid::V1Syntax("CR not followed by LF")),
        _ => Some(Invalid::V1Syntax("control or non-ASCII byte")),
    }
}

fn v1_command(text: &str) -> Result<Command, Invalid> {
    let mut fields = text.split(' ');
    let family = fields.next().unwrap_or_default();
    if family == "UNKNOWN" {
        return Ok(Command::Local);
    }
    let fields: Vec<&str> = fields.collect();
    let [source, destination, source_port, destination_port] = fields[..] else {
        return Err(Invalid::V1Syntax("expected protocol, two addresses and two ports separated by single spaces"));
    };
    let (source, destination): (IpAddr, IpAddr) = match family {
        "TCP4" => (v1_address::<Ipv4Addr>(source)?.into(), v1_address::<Ipv4Addr>(destination)?.into()),
        "TCP6" => (v1_address::<Ipv6Addr>(source)?.into(), v1_address::<Ipv6Addr>(destination)?.into()),
        _ => return Err(Invalid::V1Syntax("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Command::Proxy {
        source: SocketAddr::new(source, v1_port(source_port)?),
        destination: SocketAddr::new(destination, v1_port(destination_port)?),
    })
}

fn v1_address<A: std::str::FromStr>(text: &str) -> Result<A, Invalid> {
    text.parse().map_err(|_| Invalid::V1Syntax("address does not match the protocol"))
}

/// A decimal port without sign or leading zeros.
fn v1_port(text: &str) -> Result<u16, Invalid> {
    let bad = Invalid::V1Syntax("bad port");
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err(bad);
    }
    text.parse().map_err(|_| bad)
}

fn parse_v2(input: &[u8]) -> Parsed {
    let known = input.len().min(V2_SIGNATURE.len());
    if input[..known] != V2_SIGNATURE[..known] {
        return Parsed::Invalid(Invalid::Signature);
    }
    if input.len() < V2_FIXED_LEN {
        return Parsed::NeedMore(V2_FIXED_LEN - input.len());
    }
    let version = input[12] >> 4;
    if version != 2 {
        return Parsed::Invalid(Invalid::V2Version(version));
    }
    let local = match input[12] & 0x0f {
        0 => true,
        1 => false,
        other => return Parsed::Invalid(Invalid::V2Command(other)),
    };
    let family = input[13];
    let body = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let len = V2_FIXED_LEN + body;
    if len > V2_MAX_LEN {
        return Parsed::Invalid(Invalid::V2TooLong(len));
    }
    // A LOCAL header's addresses (if any) are ignored, whatever their family.
    if !local {
        let need = match family {
            0x11 => 12,
            0x21 => 36,
            other => return Parsed::Invalid(Invalid::Family(other)),
        };
        if body < need {
            return Parsed::Invalid(Invalid::V2Short { len: body, need });
        }
    }
    if input.len() < len {
        return Parsed::NeedMore(len - input.len());
    }
    if local {
        return Parsed::Header(Header { version: Version::V2, len, command: Command::Local });
    }
    // Addresses, then ports; TLVs after them are skipped.
    let a = &input[V2_FIXED_LEN..len];
    let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
    let (source, destination) = if family == 0x11 {
        let ip = |at: usize| IpAddr::from([a[at], a[at + 1], a[at + 2], a[at + 3]]);
        (SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))
    } else {
        let ip = |at: usize| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[at..at + 16]);
            IpAddr::from(octets)
        };
        (SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)))
    };
    Parsed::Header(Header { version: Version::V2, len, command: Command::Proxy { source, destination } })
}

/// Builders of valid headers, for tests and the fuzz harness.
pub mod build {
    use std::net::SocketAddr;

    use super::V2_SIGNATURE;

    /// A version 1 header relaying `source` to `destination` (both of one family).
    pub fn v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
        format!("PROXY {family} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port())
            .into_bytes()
    }

    /// A version 2 `PROXY` header relaying `source` to `destination` (both of one family),
    /// followed by `tlvs` (raw bytes, counted in the length).
    pub fn v2(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
        let mut addresses = Vec::new();
        let family = match (source, destination) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                addresses.extend(s.ip().octets());
                addresses.extend(d.ip().octets());
                0x11
            }
            _ => {
                let v6 = |a: SocketAddr| match a {
                    SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
                    SocketAddr::V6(a) => a.ip().octets(),
                };
                addresses.extend(v6(source));
                addresses.extend(v6(destination));
                0x21
            }
        };
        addresses.extend(source.port().to_be_bytes());
        addresses.extend(destination.port().to_be_bytes());
        addresses.extend(tlvs);
        v2_raw(0x21, family, &addresses)
    }

    /// A version 2 `LOCAL` header with no addresses.
    pub fn v2_local() -> Vec<u8> {
        v2_raw(0x20, 0x00, &[])
    }

    /// A version 2 header with the given version/command and family bytes and `body`.
    pub fn v2_raw(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(version_command);
        header.push(family);
        let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
        header.extend(len.to_be_bytes());
        header.extend(body);
        header
    }
}

#[cfg(test)]
mod tests {
    use super::build::{v1, v2, v2_local, v2_raw};
    use super::*;

    const TLS_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

    /// What follows a header on the wire: a TLS hello, longer than any first read.
    fn with_tls_after(bytes: &[u8]) -> Vec<u8> {
        let mut stream = bytes.to_vec();
        for _ in 0..8 {
            stream.extend(TLS_HELLO);
        }
        stream
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Reads `stream` the way the listener does (exactly what `NeedMore` asks for each
    /// time), checking every prefix on the way; the final answer and the bytes consumed.
    fn drive(stream: &[u8]) -> (Parsed, usize) {
        let mut consumed = 0;
        loop {
            match parse(&stream[..consumed]) {
                Parsed::NeedMore(n) => {
                    assert!(n >= 1);
                    if consumed + n > stream.len() {
                        return (Parsed::NeedMore(n), consumed);
                    }
                    consumed += n;
                }
                done => return (done, consumed),
            }
        }
    }

    /// A valid header: every strict prefix asks for more without reaching past the end,
    /// the whole is the header however much follows, and the reader stops at its end.
    fn check_valid(header: &[u8], command: Command, version: Version) {
        let expected = Parsed::Header(Header { version, len: header.len(), command });
        for split in 0..header.len() {
            match parse(&header[..split]) {
                Parsed::NeedMore(n) => assert!(n >= 1 && split + n <= header.len(), "split {split}: asks for {n}"),
                other => panic!("split {split} of {header:?}: {other:?}"),
            }
        }
        assert_eq!(parse(header), expected);
        let stream = with_tls_after(header);
        assert_eq!(parse(&stream), expected);
        assert_eq!(drive(&stream), (expected, header.len()), "the reader never takes the TLS bytes");
    }

    /// An invalid header: every prefix asks for more or gives the same error, the reader
    /// finds it, and no prefix is ever a header.
    fn check_invalid(bytes: &[u8], invalid: Invalid) {
        for split in 0..=bytes.len() {
            match parse(&bytes[..split]) {
                Parsed::NeedMore(_) => {}
                Parsed::Invalid(found) => assert_eq!(found, invalid, "split {split} of {bytes:?}"),
                Parsed::Header(h) => panic!("split {split} of {bytes:?} parsed as {h:?}"),
            }
        }
        assert_eq!(parse(bytes), Parsed::Invalid(invalid), "{bytes:?}");
        let stream = with_tls_after(bytes);
        assert_eq!(drive(&stream).0, Parsed::Invalid(invalid), "{bytes:?}");
    }

    /// A header cut short: every prefix asks for more.
    fn check_truncated(bytes: &[u8]) {
        for split in 0..=bytes.len() {
            assert!(matches!(parse(&bytes[..split]), Parsed::NeedMore(_)), "split {split} of {bytes:?}");
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown_at_every_split() {
        let (s4, d4) = (addr("192.0.2.7:51234"), addr("198.51.100.1:993"));
        check_valid(&v1(s4, d4), Command::Proxy { source: s4, destination: d4 }, Version::V1);
        let (s6, d6) = (addr("[2001:db8::7]:0"), addr("[2001:db8::1]:65535"));
        check_valid(&v1(s6, d6), Command::Proxy { source: s6, destination: d6 }, Version::V1);
        check_valid(b"PROXY UNKNOWN\r\n", Command::Local, Version::V1);
        check_valid(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Command::Local, Version::V1);
        let longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        let ffff = addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
        check_valid(longest, Command::Proxy { source: ffff, destination: ffff }, Version::V1);
        let limit = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(limit.len(), V1_MAX_LEN);
        check_valid(limit, Command::Local, Version::V1);
    }

    #[test]
    fn v1_malformed_headers_are_invalid() {
        let syntax = |bytes: &[u8]| match parse(bytes) {
            Parsed::Invalid(Invalid::V1Syntax(why)) => check_invalid(bytes, Invalid::V1Syntax(why)),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        };
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 993\n"[..],
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 993\r\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 993 7\r\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 51234 993\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 993 \r\n",
            b"PROXY TCP4 2001:db8::7 198.51.100.1 51234 993\r\n",
            b"PROXY TCP6 192.0.2.7 2001:db8::1 51234 993\r\n",
            b"PROXY TCP4 192.0.2.007 198.51.100.1 51234 993\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 993\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 993\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 0993 993\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 993\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 993\r\n",
            b"PROXY tcp4 192.0.2.7 198.51.100.1 1 993\r\n",
            b"PROXY TCP4 192.0.2.7\t198.51.100.1 1 993\r\n",
            b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 993\r\n",
            b"PROXY TCP4 192.0.\x002.7 198.51.100.1 1 993\r\n",
            "PROXY TCP4 192.0.2.7 198.51.100.1 1 99\u{661}\r\n".as_bytes(),
            b"PROXY \r\n",
            b"PROXY UNKNOWN\x01\r\n",
        ] {
            syntax(bad);
        }
    }

    #[test]
    fn v1_over_long_truncated_and_foreign_input() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'a');
        check_invalid(&long, Invalid::V1TooLong);
        long.extend(b"\r\n");
        check_invalid(&long, Invalid::V1TooLong);
        let mut just_over = b"PROXY UNKNOWN ".to_vec();
        just_over.resize(V1_MAX_LEN - 1, b'a');
        just_over.extend(b"\r\n");
        assert_eq!(parse(&just_over), Parsed::Invalid(Invalid::V1TooLong));
        check_truncated(b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 993\r");
        check_invalid(b"PROXZ TCP4", Invalid::Signature);
        check_invalid(b"proxy TCP4", Invalid::Signature);
        check_invalid(TLS_HELLO, Invalid::Signature);
        check_invalid(b"a1 LOGIN user pass\r\n", Invalid::Signature);
        check_invalid(b"\x00", Invalid::Signature);
        // Found by fuzzing: the reason must not change when a bare LF arrives later.
        check_invalid(b"PROXY \x16\x03 65535 \n", Invalid::V1Syntax("control or non-ASCII byte"));
        check_invalid(b"PROXY UNKNOWN\r \n", Invalid::V1Syntax("CR not followed by LF"));
    }

    #[test]
    fn v2_inet_inet6_local_and_tlvs_at_every_split() {
        let (s4, d4) = (addr("192.0.2.7:51234"), addr("198.51.100.1:993"));
        check_valid(&v2(s4, d4, &[]), Command::Proxy { source: s4, destination: d4 }, Version::V2);
        let (s6, d6) = (addr("[2001:db8::7]:1"), addr("[2001:db8::1]:993"));
        check_valid(&v2(s6, d6, &[]), Command::Proxy { source: s6, destination: d6 }, Version::V2);
        // A TLV (PP2_TYPE_AUTHORITY) and padding (PP2_TYPE_NOOP) are skipped.
        let tlvs = b"\x02\x00\x0bexample.com\x04\x00\x03\x00\x00\x00";
        check_valid(&v2(s4, d4, tlvs), Command::Proxy { source: s4, destination: d4 }, Version::V2);
        check_valid(&v2_local(), Command::Local, Version::V2);
        // LOCAL ignores whatever addresses come with it, of any family.
        check_valid(&v2_raw(0x20, 0x31, &[0u8; 216]), Command::Local, Version::V2);
        check_valid(&v2_raw(0x20, 0x11, &[1u8; 12]), Command::Local, Version::V2);
        // The largest accepted header.
        let biggest = v2(s6, d6, &vec![0u8; V2_MAX_LEN - 16 - 36]);
        assert_eq!(biggest.len(), V2_MAX_LEN);
        check_valid(&biggest, Command::Proxy { source: s6, destination: d6 }, Version::V2);
    }

    #[test]
    fn v2_invalid_headers_are_refused_before_their_body_is_read() {
        let (s4, d4) = (addr("192.0.2.7:51234"), addr("198.51.100.1:993"));
        let mut bad_version = v2(s4, d4, &[]);
        bad_version[12] = 0x11;
        check_invalid(&bad_version, Invalid::V2Version(1));
        let mut bad_command = v2(s4, d4, &[]);
        bad_command[12] = 0x22;
        check_invalid(&bad_command, Invalid::V2Command(2));
        for family in [0x00, 0x10, 0x12, 0x22, 0x31, 0x32, 0xff] {
            check_invalid(&v2_raw(0x21, family, &[0u8; 216]), Invalid::Family(family));
        }
        check_invalid(&v2_raw(0x21, 0x11, &[0u8; 11]), Invalid::V2Short { len: 11, need: 12 });
        check_invalid(&v2_raw(0x21, 0x21, &[0u8; 12]), Invalid::V2Short { len: 12, need: 36 });
        let too_long = v2(s4, d4, &vec![0u8; V2_MAX_LEN - 16 - 12 + 1]);
        check_invalid(&too_long, Invalid::V2TooLong(V2_MAX_LEN + 1));
        // The length alone refuses it: no need to wait for 64 KiB that may never come.
        let mut huge = v2_raw(0x21, 0x11, &[]);
        huge[14..16].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(parse(&huge), Parsed::Invalid(Invalid::V2TooLong(16 + 0xffff)));
        let mut bad_signature = v2(s4, d4, &[]);
        bad_signature[11] = b'X';
        check_invalid(&bad_signature, Invalid::Signature);
        check_invalid(b"\r\n\r\nQUIT", Invalid::Signature);
        check_truncated(&v2(s4, d4, b"\x04\x00\x01\x00")[..30]);
        check_truncated(&v2_local()[..15]);
    }

    #[test]
    fn need_more_never_reaches_past_the_shortest_header() {
        assert_eq!(parse(b""), Parsed::NeedMore(15));
        assert_eq!(parse(b"P"), Parsed::NeedMore(14));
        assert_eq!(parse(b"PROXY UNKNOWN\r"), Parsed::NeedMore(1));
        assert_eq!(parse(b"\r"), Parsed::NeedMore(15));
        assert_eq!(parse(&V2_SIGNATURE), Parsed::NeedMore(4));
    }
}
