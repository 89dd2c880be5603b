//! Fuzzing harness for Postern's pre-login parsers.
//!
//! Each function here takes arbitrary bytes, drives one parser with them and panics when
//! an invariant breaks. The libFuzzer targets in `fuzz_targets/` and the stable-Rust
//! `replay` binary both call these functions, so a crash found by one reproduces in the
//! other.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::BytesMut;
use postern::protocol::proxy::{self, Command, Parsed, Version};
use postern::protocol::sasl::{Mechanism, SaslExchange, SaslStep, decode_login_field, decode_plain, encode_plain};
use postern::protocol::{
    CredentialFault, Credentials, Dialogue, DialogueSettings, Protocol, Rejected, Step, UpstreamInfo, dialogue,
    pre_tls_dialogue,
};

/// The fuzz targets, by the name of their `fuzz_targets/` file and corpus folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The IMAP pre-login dialogue.
    ImapPreauth,
    /// The POP3 pre-login dialogue.
    Pop3Preauth,
    /// The SMTP submission pre-login dialogue.
    SmtpPreauth,
    /// SASL PLAIN and LOGIN decoding and the server-side exchange.
    Sasl,
    /// The PROXY protocol header parser (versions 1 and 2).
    ProxyHeader,
}

impl Target {
    /// Every target, in a fixed order.
    pub const ALL: [Target; 5] =
        [Target::ImapPreauth, Target::Pop3Preauth, Target::SmtpPreauth, Target::Sasl, Target::ProxyHeader];

    /// The target's name, as used by `cargo fuzz` and for its corpus folder.
    pub fn name(self) -> &'static str {
        match self {
            Target::ImapPreauth => "imap_preauth",
            Target::Pop3Preauth => "pop3_preauth",
            Target::SmtpPreauth => "smtp_preauth",
            Target::Sasl => "sasl",
            Target::ProxyHeader => "proxy_header",
        }
    }

    /// The target called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Runs one input; panics when an invariant breaks.
    pub fn run(self, data: &[u8]) {
        match self {
            Target::ImapPreauth => preauth(Protocol::Imap, data),
            Target::Pop3Preauth => preauth(Protocol::Pop3, data),
            Target::SmtpPreauth => preauth(Protocol::Smtp, data),
            Target::Sasl => sasl(data),
            Target::ProxyHeader => proxy_header(data),
        }
    }

    /// Fragments of realistic input, for generating random inputs that get past the
    /// first syntax checks.
    pub fn dictionary(self) -> &'static [&'static [u8]] {
        match self {
            Target::ImapPreauth => IMAP_WORDS,
            Target::Pop3Preauth => POP3_WORDS,
            Target::SmtpPreauth => SMTP_WORDS,
            Target::Sasl => SASL_WORDS,
            Target::ProxyHeader => PROXY_WORDS,
        }
    }

    /// How many leading bytes of an input are control bytes rather than protocol text.
    pub fn header_len(self) -> usize {
        match self {
            Target::Sasl => 1,
            Target::ProxyHeader => 0,
            _ => 2,
        }
    }
}

/// `"\0user@example.com\0p\"w"` and `"bob\0alice\0pw"` in base64, and LOGIN's two fields.
const B64_PLAIN: &[u8] = b"AHVzZXJAZXhhbXBsZS5jb20AcCJ3";
const B64_FOREIGN: &[u8] = b"Ym9iAGFsaWNlAHB3";
const B64_USER: &[u8] = b"dXNlckBleGFtcGxlLmNvbQ==";
const B64_PASSWORD: &[u8] = b"cCJ3";

const IMAP_WORDS: &[&[u8]] = &[
    b"a ",
    b"b1 ",
    b"* ",
    b"+ ",
    b"LOGIN ",
    b"login ",
    b"AUTHENTICATE ",
    b"PLAIN",
    b"LOGIN",
    b"CAPABILITY",
    b"NOOP",
    b"LOGOUT",
    b"ID ",
    b"NIL",
    b"STARTTLS",
    b"SELECT INBOX",
    b"(",
    b")",
    b"\"",
    b"\\",
    b"\"user@example.com\"",
    b"\"p\\\"w\"",
    b"user@example.com",
    b" ",
    b"{3}",
    b"{16}",
    b"{3+}",
    b"{0}",
    b"{99999999999999999999}",
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"*",
    b"=",
    B64_PLAIN,
    B64_FOREIGN,
    B64_USER,
    B64_PASSWORD,
    "pä".as_bytes(),
];

const POP3_WORDS: &[&[u8]] = &[
    b"USER ",
    b"PASS ",
    b"user ",
    b"AUTH",
    b"AUTH ",
    b"PLAIN",
    b"LOGIN",
    b"CAPA",
    b"QUIT",
    b"STLS",
    b"APOP ",
    b"STAT",
    b"RETR 1",
    b"recent:",
    b"RECENT:",
    b"user@example.com",
    b"p\"w",
    b" ",
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"*",
    b"=",
    B64_PLAIN,
    B64_FOREIGN,
    B64_USER,
    B64_PASSWORD,
    "pä".as_bytes(),
];

const SMTP_WORDS: &[&[u8]] = &[
    b"EHLO ",
    b"HELO ",
    b"ehlo ",
    b"client.example",
    b"[192.0.2.1]",
    b"AUTH ",
    b"PLAIN",
    b"LOGIN",
    b"CRAM-MD5",
    b"MAIL FROM:<a@b>",
    b"RCPT TO:<c@d>",
    b"DATA",
    b"BDAT 1",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"STARTTLS",
    b"VRFY x",
    b" ",
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"*",
    b"=",
    B64_PLAIN,
    B64_FOREIGN,
    B64_USER,
    B64_PASSWORD,
    "pä".as_bytes(),
];

const SASL_WORDS: &[&[u8]] = &[
    B64_PLAIN,
    B64_FOREIGN,
    B64_USER,
    B64_PASSWORD,
    b"\n",
    b"\r\n",
    b"*",
    b"=",
    b" ",
    b"\t",
    b"AA",
    b"AAAA",
    b"AGEAYg==",
    b"YQBiAGM=",
    b"YQ0K",
    b"/+",
    b"==",
    b"\0",
    "pä".as_bytes(),
];

const PROXY_WORDS: &[&[u8]] = &[
    b"PROXY ",
    b"TCP4 ",
    b"TCP6 ",
    b"UNKNOWN",
    b"192.0.2.7 ",
    b"198.51.100.1 ",
    b"2001:db8::7 ",
    b"::ffff:192.0.2.7 ",
    b"51234 ",
    b"993",
    b"65535",
    b"65536",
    b"0",
    b" ",
    b"\r\n",
    b"\r",
    b"\n",
    b"\r\n\r\n\0\r\nQUIT\n",
    b"\x21\x11\x00\x0c",
    b"\x21\x21\x00\x24",
    b"\x20\x00\x00\x00",
    b"\x21\x11\x02\x08",
    b"\x21\x31\x00\xd8",
    b"\xc0\x00\x02\x07\xc6\x33\x64\x01\xc8\x22\x03\xe1",
    b"\x04\x00\x01\x00",
    b"\x16\x03\x01",
    b"\0",
    b"\xff",
];

/// Drives the PROXY protocol header parser with `data` as the bytes a peer sent: every
/// prefix is parsed as a reader would see it. Checks that the answer is stable as bytes
/// arrive (a prefix that is a header or invalid stays so), that `NeedMore` never asks past
/// the header's end (the reader must not take the TLS bytes after it), that headers keep
/// to their size limits, and that a version 2 header is exactly what its fields say.
pub fn proxy_header(data: &[u8]) {
    let full = proxy::parse(data);
    let mut settled: Option<(usize, Parsed)> = None;
    for split in 0..=data.len().min(2 * proxy::V2_MAX_LEN) {
        let parsed = proxy::parse(&data[..split]);
        if let Some((at, answer)) = &settled {
            assert_eq!(&parsed, answer, "the answer at {at} bytes changed at {split}");
            continue;
        }
        match &parsed {
            Parsed::NeedMore(n) => {
                assert!(*n >= 1, "NeedMore(0) at {split}");
                if let Parsed::Header(h) = &full {
                    assert!(split + n <= h.len, "at {split}, asks for {n}: past the {}-byte header", h.len);
                }
            }
            Parsed::Header(h) => {
                assert!(h.len <= split, "a {}-byte header from {split} bytes", h.len);
                settled = Some((split, parsed.clone()));
            }
            Parsed::Invalid(_) => settled = Some((split, parsed.clone())),
        }
    }
    if let Some((_, answer)) = &settled {
        assert_eq!(&full, answer, "the whole input disagrees with its prefix");
    }
    let Parsed::Header(header) = full else { return };
    assert!(header.len <= data.len());
    match header.version {
        Version::V1 => {
            assert!(header.len <= proxy::V1_MAX_LEN);
            assert!(data[..header.len].ends_with(b"\r\n"));
            assert!(data[..header.len - 2].iter().all(|b| (b' '..=b'~').contains(b)), "only printable ASCII");
            if let Command::Proxy { source, destination } = header.command {
                assert_eq!(source.is_ipv4(), destination.is_ipv4(), "one family");
                let family: &[u8] = if source.is_ipv4() { b"PROXY TCP4 " } else { b"PROXY TCP6 " };
                assert!(data.starts_with(family));
            }
        }
        Version::V2 => {
            assert!(header.len <= proxy::V2_MAX_LEN);
            assert!(data.starts_with(&proxy::V2_SIGNATURE));
            match header.command {
                Command::Local => assert_eq!(data[12], 0x20),
                Command::Proxy { source, destination } => {
                    let need = if source.is_ipv4() { 12 } else { 36 };
                    let rebuilt = proxy::build::v2(source, destination, &data[16 + need..header.len]);
                    assert_eq!(rebuilt, &data[..header.len], "the header says what its bytes say");
                }
            }
        }
    }
}

/// Whether `text` holds a byte no credential may carry upstream.
fn has_nul_cr_lf(text: &str) -> bool {
    text.contains(['\0', '\r', '\n'])
}

/// A reply must be whole CRLF-terminated lines with no stray CR or LF, so that nothing
/// the client sent can split it or forge a line.
fn check_reply(reply: &[u8]) {
    assert!(reply.ends_with(b"\r\n"), "reply not CRLF-terminated: {reply:?}");
    for (i, &b) in reply.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(reply.get(i + 1), Some(&b'\n'), "bare CR in reply: {reply:?}"),
            b'\n' => assert_eq!(reply.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF in reply: {reply:?}"),
            b'\0' => panic!("NUL in reply: {reply:?}"),
            _ => {}
        }
    }
}

/// What a dialogue may hand to the access decision.
fn check_credentials(protocol: Protocol, c: &Credentials) {
    assert!(!c.user.is_empty(), "empty user name");
    assert_eq!(c.user.trim(), c.user, "untrimmed user name");
    assert!(!c.user.chars().any(char::is_control), "control character in user name");
    assert!(!c.password.is_empty(), "empty password");
    assert!(!has_nul_cr_lf(c.password.expose()), "NUL, CR or LF in password");
    assert!(!has_nul_cr_lf(&c.upstream_prefix), "NUL, CR or LF in upstream prefix");
    assert!(protocol == Protocol::Pop3 || c.upstream_prefix.is_empty(), "{protocol} login with upstream prefix");
    assert!(!c.mechanism.is_empty(), "no mechanism");
    match (protocol, &c.client_hello) {
        (Protocol::Smtp, Some(hello)) => {
            assert!(
                !hello.is_empty() && hello.bytes().all(|b| b.is_ascii_graphic()),
                "unprintable client hello {hello:?}"
            );
        }
        (Protocol::Smtp, None) => panic!("SMTP login without EHLO/HELO"),
        (_, hello) => assert!(hello.is_none(), "{protocol} login with a client hello"),
    }
}

/// What a dialogue may hand to the session as a refusal of its own.
fn check_rejected(r: &Rejected) {
    if let Some(user) = &r.user {
        assert!(!user.is_empty() && user.trim() == user, "bad refused user {user:?}");
        assert!(!user.chars().any(char::is_control), "control character in refused user");
    }
    assert!(!r.mechanism.is_empty(), "no mechanism");
}

/// 64-bit xorshift: cheap, deterministic, good enough to vary chunk sizes.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed`; any seed works, zero included.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next pseudo-random value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..bound`; `bound` must not be zero.
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}

/// How a pre-login input is run, decoded from its first two bytes.
///
/// Byte 0: 0 feeds everything at once, otherwise chunks of 1 to that many bytes, sizes
/// drawn from a generator seeded with it. Byte 1: bits 0–1 are how many logins are
/// refused before one is accepted, bits 2–3 pick the upstream capabilities, bits 4–7
/// the limits (0: the defaults; 1–15: tiny ones, to reach the over-long paths).
struct Plan {
    max_chunk: usize,
    chunk_seed: u8,
    refusals: u8,
    capabilities: Option<&'static str>,
    settings: DialogueSettings,
}

impl Plan {
    fn new(b0: u8, b1: u8) -> Self {
        let tier = usize::from(b1 >> 4);
        let mut settings = DialogueSettings {
            hostname: "fuzz.example".to_owned(),
            smtp_max_size: Some(35_000_000),
            ..DialogueSettings::default()
        };
        if tier > 0 {
            settings.max_line = 16 * tier;
            settings.max_literal = 8 * (tier - 1);
            settings.smtp_max_size = None;
        }
        Plan {
            max_chunk: if b0 == 0 { usize::MAX } else { usize::from(b0) },
            chunk_seed: b0,
            refusals: b1 & 3,
            capabilities: match (b1 >> 2) & 3 {
                0 => None,
                1 => Some("IMAP4rev1 IDLE UIDPLUS"),
                2 => Some("IMAP4rev1]\r\n* BYE"),
                _ => Some(" "),
            },
            settings,
        }
    }
}

/// Feeds `data` (after a two-byte [`Plan`] header) to a fresh `protocol` dialogue in
/// chunks, stepping until it needs more or closes. Logins are refused (alternately
/// denied and unavailable) as often as the plan says, then accepted, which ends the run
/// as it ends the pre-login phase of a real session.
///
/// Checks that the dialogue only ever consumes from the front of its input and leaves
/// the rest untouched, that replies and logins consume input, that every reply is
/// well-formed CRLF lines, and that credentials hold no NUL, CR or LF.
///
/// The same input then runs again from the STARTTLS listener's pre-TLS dialogue, which
/// must never yield a login, and only refusals for want of TLS; after its go-ahead, the
/// buffered rest is dropped and the protocol's dialogue goes on, as in a session.
pub fn preauth(protocol: Protocol, data: &[u8]) {
    let b0 = data.first().copied().unwrap_or(0);
    let b1 = data.get(1).copied().unwrap_or(0);
    let stream = data.get(2..).unwrap_or_default();
    let plan = Plan::new(b0, b1);
    drive(protocol, &plan, stream, false);
    drive(protocol, &plan, stream, true);
}

/// One run of [`preauth`], from the pre-TLS dialogue when `pre_tls`.
fn drive(protocol: Protocol, plan: &Plan, stream: &[u8], pre_tls: bool) {
    let mut d = if pre_tls { pre_tls_dialogue(protocol, &plan.settings) } else { dialogue(protocol, &plan.settings) };
    let mut encrypted = !pre_tls;
    check_reply(&d.greeting());

    let mut sizes = XorShift::new(u64::from(plan.chunk_seed));
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut refused = 0;
    // The previous step was a literal the dialogue was just told about: its answer (the
    // continuation or the refusal) consumes no input.
    let mut literal_answered = false;
    'feed: while fed < stream.len() {
        let size = match plan.max_chunk {
            usize::MAX => stream.len() - fed,
            max => (1 + sizes.below(max)).min(stream.len() - fed),
        };
        buf.extend_from_slice(&stream[fed..fed + size]);
        fed += size;
        loop {
            let before = buf.len();
            let step = d.step(&mut buf);
            assert!(buf.len() <= before, "step grew the buffer");
            assert_eq!(&buf[..], &stream[fed - buf.len()..fed], "step altered unread input");
            let consumed = buf.len() < before;
            let answering_literal = std::mem::take(&mut literal_answered);
            match step {
                Step::NeedMore => break,
                Step::Literal(size) => {
                    assert!(consumed, "literal announced without consuming input");
                    assert!(size > 0 && size <= plan.settings.max_literal, "literal of {size} bytes asked for");
                    let granted = sizes.below(4) != 0;
                    d.literal_room(granted);
                    if granted {
                        assert!(d.held() >= size, "a granted literal is not counted as held");
                    }
                    literal_answered = true;
                }
                Step::Reply(reply) => {
                    assert!(consumed || answering_literal, "reply without consuming input");
                    check_reply(&reply);
                }
                Step::Close(reply) => {
                    check_reply(&reply);
                    break 'feed;
                }
                Step::StartTls(reply) => {
                    assert!(consumed, "STARTTLS without consuming input");
                    assert!(!encrypted, "STARTTLS offered over TLS");
                    check_reply(&reply);
                    buf.clear();
                    d = dialogue(protocol, &plan.settings);
                    encrypted = true;
                }
                Step::Refused(rejected) => {
                    assert!(consumed, "refusal without consuming input");
                    check_rejected(&rejected);
                    assert_eq!(
                        rejected.fault == CredentialFault::TlsRequired,
                        !encrypted,
                        "refusal {rejected:?} with encrypted = {encrypted}"
                    );
                    if !encrypted {
                        assert!(rejected.user.is_none(), "a user name kept from before TLS");
                    }
                    check_reply(&d.denied());
                }
                Step::Login(credentials) => {
                    assert!(consumed, "login without consuming input");
                    assert!(encrypted, "login before TLS");
                    check_credentials(protocol, &credentials);
                    if refused == plan.refusals {
                        let info = UpstreamInfo { capabilities: plan.capabilities.map(str::to_owned) };
                        check_reply(&d.accepted(&info));
                        break 'feed;
                    }
                    let reply = if refused % 2 == 0 { d.denied() } else { d.unavailable() };
                    check_reply(&reply);
                    refused += 1;
                }
            }
        }
    }
    goodbyes(d.as_ref());
}

fn goodbyes(d: &dyn Dialogue) {
    check_reply(&d.timed_out());
    check_reply(&d.shutting_down());
    check_reply(&d.busy());
}

/// Runs one SASL input: byte 0 picks the mechanism (bit 0: LOGIN, else PLAIN) and
/// whether the first line is an initial response (bit 1); the rest is client lines
/// separated by LF (a CR before the LF is stripped, as the dialogues do).
///
/// Besides driving [`SaslExchange`], checks [`decode_plain`] and
/// [`decode_login_field`] on the whole text, and against a model of what they must
/// accept when the text is first base64-encoded.
pub fn sasl(data: &[u8]) {
    let Some((&mode, text)) = data.split_first() else {
        return;
    };
    check_decoders(text);

    let mechanism = if mode & 1 == 0 { Mechanism::Plain } else { Mechanism::Login };
    let mut lines = text.split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let initial = if mode & 2 != 0 { lines.next() } else { None };
    let (mut exchange, mut step) = SaslExchange::start(mechanism, initial);
    assert_eq!(exchange.mechanism(), mechanism);
    let mut challenges = 0;
    let over = loop {
        match step {
            SaslStep::Challenge(challenge) => {
                challenges += 1;
                assert!(challenges <= 2, "more than two challenges");
                assert!(STANDARD.decode(challenge).is_ok(), "challenge not base64");
                match lines.next() {
                    Some(line) => step = exchange.respond(line),
                    None => break false,
                }
            }
            SaslStep::Done { user, password } => {
                assert!(!user.is_empty() && user.trim() == user, "bad user {user:?}");
                assert!(!user.chars().any(char::is_control), "control character in user");
                assert!(!password.is_empty(), "empty password");
                assert!(!has_nul_cr_lf(password.expose()), "NUL, CR or LF in password");
                break true;
            }
            SaslStep::Refused { user, .. } => {
                if let Some(user) = user {
                    assert!(!user.is_empty() && user.trim() == user, "bad refused user {user:?}");
                    assert!(!user.chars().any(char::is_control), "control character in refused user");
                }
                break true;
            }
            SaslStep::Cancelled | SaslStep::Invalid(_) => break true,
        }
    };
    if over {
        assert!(matches!(exchange.respond(B64_PLAIN), SaslStep::Invalid(_)), "exchange went on after it ended");
    }
    if let Some(first) = text.split(|&b| b == b' ').next() {
        let expected = if first.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if first.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        };
        assert_eq!(Mechanism::parse(first), expected);
    }
}

/// The decoders on `text` as given, then on `text` base64-encoded against a model.
fn check_decoders(text: &[u8]) {
    if let Ok(plain) = decode_plain(text) {
        assert!(!plain.authcid.is_empty(), "empty authcid");
        for field in [&plain.authzid, &plain.authcid, plain.password.expose()] {
            assert!(!has_nul_cr_lf(field), "NUL, CR or LF in PLAIN field");
        }
        if plain.authzid.is_empty() && !plain.password.is_empty() {
            let again = decode_plain(encode_plain(&plain.authcid, plain.password.expose()).as_bytes())
                .expect("re-encoded PLAIN decodes");
            assert_eq!(again.authcid, plain.authcid);
            assert_eq!(again.password, plain.password);
        }
    }
    if let Ok(field) = decode_login_field(text) {
        assert!(!has_nul_cr_lf(field.expose()), "NUL, CR or LF in LOGIN field");
    }

    let encoded = STANDARD.encode(text);
    let field_ok = |raw: &[u8]| std::str::from_utf8(raw).is_ok_and(|s| !has_nul_cr_lf(s));
    match decode_login_field(encoded.as_bytes()) {
        Ok(field) => assert_eq!(field.expose().as_bytes(), text),
        Err(_) => assert!(!field_ok(text), "valid LOGIN field refused"),
    }
    let fields: Vec<&[u8]> = text.split(|&b| b == 0).collect();
    let plain_ok = match fields.as_slice() {
        [authzid, authcid, password] => !authcid.is_empty() && [authzid, authcid, password].iter().all(|f| field_ok(f)),
        _ => false,
    };
    match decode_plain(encoded.as_bytes()) {
        Ok(plain) => {
            assert!(plain_ok, "invalid PLAIN response accepted");
            assert_eq!(plain.authzid.as_bytes(), fields[0]);
            assert_eq!(plain.authcid.as_bytes(), fields[1]);
            assert_eq!(plain.password.expose().as_bytes(), fields[2]);
        }
        Err(_) => assert!(!plain_ok, "valid PLAIN response refused"),
    }
}

/// Makes a pseudo-random input for `target`: random header bytes, then a mix of
/// dictionary words (mostly) and random bytes.
pub fn random_input(target: Target, rng: &mut XorShift) -> Vec<u8> {
    let mut input: Vec<u8> = (0..target.header_len()).map(|_| rng.next_u64() as u8).collect();
    let words = target.dictionary();
    for _ in 0..1 + rng.below(48) {
        if rng.below(100) < 12 {
            input.push(rng.next_u64() as u8);
        } else {
            input.extend_from_slice(words[rng.below(words.len())]);
        }
    }
    input
}
