//! The access decision against large profiles files, and the cost of (re)loading them.

use std::fmt::Write;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, Throughput};
use postern::access::certificate::CertificateStatus::Absent;
use postern::access::decision::check_profiles;
use postern::access::profiles::Profiles;
use postern::protocol::Protocol;

const ENTRIES: usize = 1_000;
const USER: &str = "alice@example.com";
/// Only the last entry of each file contains this address.
const LAST: &str = "203.0.113.77";
/// No entry contains this address.
const STRANGER: &str = "192.0.2.1";

/// The `i`-th allow entry: cycling through an IPv4 host, an IPv4 /24 and an IPv6 /48,
/// none of which overlap each other or the two client addresses above.
fn entry(i: usize) -> String {
    let (hi, lo) = (i / 256, i % 256);
    match i % 3 {
        0 => format!("10.{hi}.{lo}.9"),
        1 => format!("172.{}.{lo}.0/24", 16 + hi),
        _ => format!("2001:db8:{i:x}::/48"),
    }
}

/// The last entry, the only one matching [`LAST`].
fn last_entry() -> String {
    format!("{LAST}/32")
}

/// One profile for [`USER`] with [`ENTRIES`] allow entries, the matching one last.
fn one_big_profile() -> String {
    let mut allow: Vec<String> = (0..ENTRIES - 1).map(entry).collect();
    allow.push(last_entry());
    let list = allow.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    format!("[[profile]]\nname = \"big\"\nusers = [\"{USER}\"]\nallow = [{list}]\n")
}

/// [`ENTRIES`] profiles of one entry, one user and one group each, the matching one last.
fn many_profiles() -> String {
    let mut text = String::new();
    for i in 0..ENTRIES {
        let allow = if i == ENTRIES - 1 { last_entry() } else { entry(i) };
        let _ = write!(
            text,
            "[[profile]]\nname = \"p{i}\"\nusers = [\"user{i}@example.com\"]\ngroups = [\"team{}\"]\n\
             protocols = [\"imap\", \"smtp\"]\nallow = [\"{allow}\"]\n\n",
            i % 10
        );
    }
    text
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("benchmark address")
}

/// Benchmarks `check_profiles` and `any_allows` with the match last and with none,
/// and parsing both generated files.
pub fn bench(c: &mut Criterion) {
    let big_text = one_big_profile();
    let many_text = many_profiles();
    let big = Profiles::parse(&big_text).expect("generated profiles parse");
    let many = Profiles::parse(&many_text).expect("generated profiles parse");
    let (last, stranger) = (ip(LAST), ip(STRANGER));
    let groups: Vec<String> = Vec::new();

    assert!(check_profiles(&big, USER, &groups, Protocol::Imap, last, &Absent).is_ok());
    assert!(check_profiles(&big, USER, &groups, Protocol::Imap, stranger, &Absent).is_err());
    assert!(many.any_allows(last) && !many.any_allows(stranger));

    let mut group = c.benchmark_group("access");
    group.bench_function("check_profiles_1000_entries_match_last", |b| {
        b.iter(|| check_profiles(&big, black_box(USER), &groups, Protocol::Imap, black_box(last), &Absent))
    });
    group.bench_function("check_profiles_1000_entries_no_match", |b| {
        b.iter(|| check_profiles(&big, black_box(USER), &groups, Protocol::Imap, black_box(stranger), &Absent))
    });
    group.bench_function("any_allows_1000_profiles_match_last", |b| b.iter(|| many.any_allows(black_box(last))));
    group.bench_function("any_allows_1000_profiles_no_match", |b| b.iter(|| many.any_allows(black_box(stranger))));
    for (name, text) in [("parse_1000_entries", &big_text), ("parse_1000_profiles", &many_text)] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name, |b| b.iter(|| Profiles::parse(black_box(text))));
    }
    group.finish();
}
