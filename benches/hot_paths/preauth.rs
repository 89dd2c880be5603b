//! Pre-login parsing: one whole client exchange, from the greeting to `Step::Login`.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput};
use postern::protocol::sasl::encode_plain;
use postern::protocol::{Credentials, DialogueSettings, Protocol, Step, dialogue};

const USER: &str = "user@example.com";
const PASSWORD: &str = "p\"w";

/// A named client script that must end in a login as [`USER`] with [`PASSWORD`].
struct Script {
    name: &'static str,
    protocol: Protocol,
    input: Vec<u8>,
}

fn scripts() -> Vec<Script> {
    let plain = encode_plain(USER, PASSWORD);
    vec![
        Script {
            name: "imap_capability_login",
            protocol: Protocol::Imap,
            input: b"a CAPABILITY\r\nb LOGIN \"user@example.com\" \"p\\\"w\"\r\n".to_vec(),
        },
        Script {
            name: "imap_login_literals",
            protocol: Protocol::Imap,
            input: b"a LOGIN {16}\r\nuser@example.com {3}\r\np\"w\r\n".to_vec(),
        },
        Script {
            name: "imap_authenticate_plain_ir",
            protocol: Protocol::Imap,
            input: format!("a AUTHENTICATE PLAIN {plain}\r\n").into_bytes(),
        },
        Script {
            name: "pop3_user_pass",
            protocol: Protocol::Pop3,
            input: b"CAPA\r\nUSER user@example.com\r\nPASS p\"w\r\n".to_vec(),
        },
        Script {
            name: "smtp_ehlo_auth_plain",
            protocol: Protocol::Smtp,
            input: format!("EHLO client.example\r\nAUTH PLAIN {plain}\r\n").into_bytes(),
        },
    ]
}

/// Runs `input` through a fresh dialogue, `chunk` bytes at a time, up to the login.
fn exchange(protocol: Protocol, settings: &DialogueSettings, input: &[u8], chunk: usize) -> Credentials {
    let mut d = dialogue(protocol, settings);
    black_box(d.greeting());
    let mut pieces = input.chunks(chunk);
    let mut buf = BytesMut::with_capacity(input.len());
    loop {
        match d.step(&mut buf) {
            Step::Reply(reply) => {
                black_box(reply);
            }
            Step::Login(credentials) => return credentials,
            Step::Literal(_) => d.literal_room(true),
            Step::NeedMore => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => panic!("{protocol} script ended without a login"),
            },
            Step::Close(reply) => panic!("{protocol} closed: {}", String::from_utf8_lossy(&reply)),
            Step::Refused(rejected) => panic!("{protocol} refused the script's login: {rejected:?}"),
            Step::StartTls(reply) => panic!("{protocol} started TLS: {}", String::from_utf8_lossy(&reply)),
        }
    }
}

/// Benchmarks every script fed whole, and the first one also fed a byte at a time, the
/// worst case for line framing.
pub fn bench(c: &mut Criterion) {
    let settings = DialogueSettings::default();
    let mut group = c.benchmark_group("preauth");
    for script in scripts() {
        let login = exchange(script.protocol, &settings, &script.input, usize::MAX);
        assert_eq!((login.user.as_str(), login.password.expose()), (USER, PASSWORD), "{}", script.name);
        group.throughput(Throughput::Bytes(script.input.len() as u64));
        group.bench_function(script.name, |b| {
            b.iter(|| exchange(script.protocol, &settings, black_box(&script.input), usize::MAX))
        });
    }
    let bytewise = &scripts()[0];
    group.throughput(Throughput::Bytes(bytewise.input.len() as u64));
    group.bench_function("imap_capability_login_bytewise", |b| {
        b.iter(|| exchange(bytewise.protocol, &settings, black_box(&bytewise.input), 1))
    });
    group.finish();
}
