//! SMTP submission pre-login dialogue (RFC 6409, AUTH from RFC 4954).
//!
//! The client greets with `EHLO`/`HELO` and authenticates with `AUTH PLAIN|LOGIN`; mail
//! transactions are refused until then. Each `step` answers one command, so pipelined
//! commands get their replies in order.

use bytes::BytesMut;

use super::line::{self, BadCommands, LineState, NextLine};
use super::sasl::{Mechanism, SaslError, SaslExchange, SaslStep};
use super::{CredentialFault, Credentials, DENIAL_TEXT, Dialogue, DialogueSettings, Rejected, Step, UpstreamInfo};

/// SMTP submission pre-login state machine.
pub struct SmtpDialogue {
    max_line: usize,
    hostname: String,
    max_size: Option<u64>,
    state: LineState,
    bad: BadCommands,
    /// The name from the latest `EHLO`/`HELO`; `AUTH` needs one.
    hello: Option<String>,
    /// Before TLS on a STARTTLS listener: only `EHLO`/`HELO`, `STARTTLS`, `NOOP`, `RSET`
    /// and `QUIT` run.
    pre_tls: bool,
}

/// The answer to `AUTH` and mail commands before TLS (RFC 3207).
const TLS_REQUIRED: &str = "530 5.7.0 Must issue a STARTTLS command first\r\n";

impl SmtpDialogue {
    /// A dialogue for a new connection.
    pub fn new(settings: &DialogueSettings) -> Self {
        Self {
            max_line: settings.max_line,
            hostname: settings.hostname.clone(),
            max_size: settings.smtp_max_size,
            state: LineState::Command,
            bad: BadCommands::default(),
            hello: None,
            pre_tls: false,
        }
    }

    /// A dialogue for a new connection on a STARTTLS listener, before TLS; it ends with
    /// [`Step::StartTls`] and the session goes on over TLS with [`SmtpDialogue::new`],
    /// which knows nothing of what was said before (RFC 3207 section 4.2).
    pub fn pre_tls(settings: &DialogueSettings) -> Self {
        Self { pre_tls: true, ..Self::new(settings) }
    }

    /// A command before TLS. `AUTH` is refused unread; `STARTTLS` consumes its own line
    /// only, so whatever the client sent after it stays for the session to discard.
    fn command_pre_tls(&mut self, line: &[u8]) -> Step {
        let (verb, rest) = line::split_verb(line);
        match verb.to_ascii_uppercase().as_slice() {
            b"EHLO" | b"HELO" | b"RSET" | b"NOOP" | b"QUIT" => self.command(line),
            b"STARTTLS" if line::words(rest).next().is_none() => {
                self.state = LineState::Finished;
                Step::StartTls(b"220 2.0.0 Ready to start TLS\r\n".to_vec())
            }
            b"STARTTLS" => self.fail("501 5.5.4 Syntax: STARTTLS\r\n"),
            b"AUTH" => {
                self.state = LineState::Deciding;
                Step::Refused(Rejected { user: None, mechanism: "AUTH", fault: CredentialFault::TlsRequired })
            }
            b"MAIL" | b"RCPT" | b"DATA" | b"BDAT" => self.fail(TLS_REQUIRED),
            b"VRFY" | b"EXPN" => self.fail("502 5.5.1 Command not implemented\r\n"),
            _ => self.fail("500 5.5.2 Command unrecognized\r\n"),
        }
    }

    /// Answers a failed or invalid command, closing once too many have been seen.
    fn fail(&mut self, reply: &str) -> Step {
        if self.bad.record() {
            self.state = LineState::Finished;
            let bye = format!("421 4.7.0 {} Too many invalid commands\r\n", self.hostname);
            return Step::Close(bye.into_bytes());
        }
        Step::Reply(reply.as_bytes().to_vec())
    }

    fn command(&mut self, line: &[u8]) -> Step {
        let (verb, rest) = line::split_verb(line);
        match verb.to_ascii_uppercase().as_slice() {
            b"EHLO" | b"HELO" => self.hello(verb.eq_ignore_ascii_case(b"EHLO"), rest),
            b"AUTH" => self.auth(rest),
            b"MAIL" | b"RCPT" | b"DATA" | b"BDAT" => self.fail("530 5.7.0 Authentication required\r\n"),
            b"RSET" | b"NOOP" => Step::Reply(b"250 2.0.0 OK\r\n".to_vec()),
            b"QUIT" => {
                self.state = LineState::Finished;
                Step::Close(b"221 2.0.0 Bye\r\n".to_vec())
            }
            b"STARTTLS" => self.fail("503 5.5.1 TLS already active\r\n"),
            b"VRFY" | b"EXPN" => self.fail("502 5.5.1 Command not implemented\r\n"),
            _ => self.fail("500 5.5.2 Command unrecognized\r\n"),
        }
    }

    fn hello(&mut self, extended: bool, args: &[u8]) -> Step {
        let Some(name) = line::words(args).next() else {
            return self.fail("501 5.5.4 Syntax: EHLO hostname\r\n");
        };
        // The name is repeated in the upstream EHLO, so only printable ASCII may pass.
        if !name.iter().all(|b| b.is_ascii_graphic()) {
            return self.fail("501 5.5.4 Invalid domain name\r\n");
        }
        self.hello = Some(String::from_utf8_lossy(name).into_owned());
        if !extended {
            return Step::Reply(format!("250 {}\r\n", self.hostname).into_bytes());
        }
        if self.pre_tls {
            // No PIPELINING and no AUTH before TLS: only the way to it.
            let reply = format!("250-{}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n", self.hostname);
            return Step::Reply(reply.into_bytes());
        }
        let mut reply =
            format!("250-{}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n", self.hostname);
        if let Some(size) = self.max_size {
            reply.push_str(&format!("250-SIZE {size}\r\n"));
        }
        reply.push_str("250 AUTH PLAIN LOGIN\r\n");
        Step::Reply(reply.into_bytes())
    }

    fn auth(&mut self, args: &[u8]) -> Step {
        if self.hello.is_none() {
            return self.fail("503 5.5.1 Send EHLO first\r\n");
        }
        let mut words = line::words(args);
        let (mechanism, initial) = match (words.next(), words.next(), words.next()) {
            (Some(mechanism), initial, None) => (mechanism, initial),
            _ => return self.fail("501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        };
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            return self.fail("504 5.5.4 Unrecognized authentication type\r\n");
        };
        let (exchange, step) = SaslExchange::start(mechanism, initial);
        self.sasl(exchange, step)
    }

    fn sasl(&mut self, exchange: SaslExchange, step: SaslStep) -> Step {
        match step {
            SaslStep::Challenge(challenge) => {
                self.state = LineState::Sasl(exchange);
                Step::Reply(format!("334 {challenge}\r\n").into_bytes())
            }
            SaslStep::Done { user, password } => {
                self.state = LineState::Deciding;
                Step::Login(Credentials {
                    user,
                    upstream_prefix: String::new(),
                    password,
                    mechanism: sasl_mechanism(&exchange),
                    client_hello: self.hello.clone(),
                })
            }
            SaslStep::Refused { user, fault } => {
                self.state = LineState::Deciding;
                Step::Refused(Rejected { user, mechanism: sasl_mechanism(&exchange), fault })
            }
            SaslStep::Cancelled => self.fail("501 5.0.0 Authentication cancelled\r\n"),
            SaslStep::Invalid(SaslError::InvalidBase64) => self.fail("501 5.5.2 Invalid base64\r\n"),
            SaslStep::Invalid(SaslError::Malformed) => self.fail("501 5.5.2 Invalid SASL response\r\n"),
        }
    }
}

/// The mechanism of an `AUTH` login, for the audit log.
fn sasl_mechanism(exchange: &SaslExchange) -> &'static str {
    match exchange.mechanism() {
        Mechanism::Plain => "AUTH PLAIN",
        Mechanism::Login => "AUTH LOGIN",
    }
}

impl Dialogue for SmtpDialogue {
    fn greeting(&mut self) -> Vec<u8> {
        format!("220 {} ESMTP Postern\r\n", self.hostname).into_bytes()
    }

    fn step(&mut self, input: &mut BytesMut) -> Step {
        match self.state.next(input, self.max_line, b"500 5.5.2 Line too long\r\n") {
            NextLine::Step(step) => step,
            NextLine::Command(line) if self.pre_tls => self.command_pre_tls(&line),
            NextLine::Command(line) => self.command(&line),
            NextLine::Sasl(line, mut exchange) => {
                let step = exchange.respond(&line);
                self.sasl(exchange, step)
            }
        }
    }

    fn denied(&mut self) -> Vec<u8> {
        self.state.refused();
        if self.pre_tls {
            // Before TLS the only refusal is that one.
            return TLS_REQUIRED.as_bytes().to_vec();
        }
        format!("535 5.7.8 {DENIAL_TEXT}\r\n").into_bytes()
    }

    fn unavailable(&mut self) -> Vec<u8> {
        self.state.refused();
        b"454 4.7.0 Mail service temporarily unavailable, try again later\r\n".to_vec()
    }

    fn accepted(&mut self, _upstream: &UpstreamInfo) -> Vec<u8> {
        self.state = LineState::Finished;
        b"235 2.7.0 Authentication successful\r\n".to_vec()
    }

    fn timed_out(&self) -> Vec<u8> {
        format!("421 4.4.2 {} Timeout; login took too long\r\n", self.hostname).into_bytes()
    }

    fn shutting_down(&self) -> Vec<u8> {
        format!("421 4.3.2 {} Server shutting down\r\n", self.hostname).into_bytes()
    }

    fn too_many_connections(&self) -> Vec<u8> {
        format!("421 4.7.0 {} Too many connections from your address; try again later\r\n", self.hostname).into_bytes()
    }

    fn busy(&self) -> Vec<u8> {
        format!("421 4.3.2 {} Server busy; try again later\r\n", self.hostname).into_bytes()
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::protocol::limits::MAX_BAD_COMMANDS;
    use crate::protocol::line::testing::{self, Decision, b64, fuzz, run};

    fn settings() -> DialogueSettings {
        DialogueSettings {
            max_line: 200,
            hostname: "mx.example.net".into(),
            smtp_max_size: Some(35_000_000),
            ..DialogueSettings::default()
        }
    }

    fn make() -> Box<dyn Dialogue> {
        Box::new(SmtpDialogue::new(&settings()))
    }

    fn check(input: impl AsRef<[u8]>, expected: &[&str], leftover: &str) {
        testing::check(&make, input, expected, leftover);
    }

    const EHLO: &str = "250-mx.example.net\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
250-ENHANCEDSTATUSCODES\r\n250-SIZE 35000000\r\n250 AUTH PLAIN LOGIN\r\n";
    const DENY: &str = "535 5.7.8 You are not allowed to access this server\r\n";

    #[test]
    fn greeting_and_simple_commands() {
        assert_eq!(make().greeting(), b"220 mx.example.net ESMTP Postern\r\n");
        check("EHLO client.example\r\n", &[EHLO], "");
        check("ehlo client.example\n", &[EHLO], "");
        check("HELO client.example\r\n", &["250 mx.example.net\r\n"], "");
        check("EHLO\r\n", &["501 5.5.4 Syntax: EHLO hostname\r\n"], "");
        check("HELO  \r\n", &["501 5.5.4 Syntax: EHLO hostname\r\n"], "");
        check("EHLO a\x01b\r\n", &["501 5.5.4 Invalid domain name\r\n"], "");
        check("RSET\r\nNOOP\r\n", &["250 2.0.0 OK\r\n", "250 2.0.0 OK\r\n"], "");
        check("QUIT\r\nNOOP\r\n", &["CLOSE 221 2.0.0 Bye\r\n"], "NOOP\r\n");
        check("STARTTLS\r\n", &["503 5.5.1 TLS already active\r\n"], "");
        check("VRFY root\r\n", &["502 5.5.1 Command not implemented\r\n"], "");
        check("FROB\r\n", &["500 5.5.2 Command unrecognized\r\n"], "");
        check("AUTH PLAIN\r\n", &["503 5.5.1 Send EHLO first\r\n"], "");
        check("EHLO c\r\nAUTH\r\n", &[EHLO, "501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"], "");
        check("EHLO c\r\nAUTH CRAM-MD5\r\n", &[EHLO, "504 5.5.4 Unrecognized authentication type\r\n"], "");
        let mut d = SmtpDialogue::new(&DialogueSettings::default());
        let Step::Reply(reply) = d.hello(true, b"c") else { panic!("no EHLO reply") };
        assert!(!String::from_utf8(reply).unwrap().contains("SIZE"));
    }

    #[test]
    fn mail_before_auth_is_refused_in_pipeline() {
        check(
            "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
            &[
                EHLO,
                "530 5.7.0 Authentication required\r\n",
                "530 5.7.0 Authentication required\r\n",
                "530 5.7.0 Authentication required\r\n",
            ],
            "",
        );
    }

    #[test]
    fn auth_plain_and_login() {
        let pw = "pä ss\"w\\rd";
        let plain = b64(&format!("\0alice@example.com\0{pw}"));
        let plain_login = format!("LOGIN alice@example.com||{pw}|AUTH PLAIN|client.example");
        check(format!("EHLO client.example\r\nAUTH PLAIN {plain}\r\n"), &[EHLO, &plain_login, DENY], "");
        check(format!("EHLO client.example\r\nAUTH plain\r\n{plain}\r\n"), &[EHLO, "334 \r\n", &plain_login, DENY], "");
        let login = format!("LOGIN alice||{pw}|AUTH LOGIN|h");
        check(
            format!("HELO h\r\nAUTH LOGIN\r\n{}\r\n{}\r\n", b64("alice"), b64(pw)),
            &["250 mx.example.net\r\n", "334 VXNlcm5hbWU6\r\n", "334 UGFzc3dvcmQ6\r\n", &login, DENY],
            "",
        );
        check(
            format!("HELO h\r\nAUTH LOGIN {}\r\n{}\r\n", b64("alice"), b64(pw)),
            &["250 mx.example.net\r\n", "334 UGFzc3dvcmQ6\r\n", &login, DENY],
            "",
        );
        check(
            "HELO h\r\nAUTH PLAIN\r\n*\r\n",
            &["250 mx.example.net\r\n", "334 \r\n", "501 5.0.0 Authentication cancelled\r\n"],
            "",
        );
        check("HELO h\r\nAUTH PLAIN @@@\r\n", &["250 mx.example.net\r\n", "501 5.5.2 Invalid base64\r\n"], "");
        check("HELO h\r\nAUTH PLAIN =\r\n", &["250 mx.example.net\r\n", "501 5.5.2 Invalid SASL response\r\n"], "");
        let foreign = b64("bob\0alice\0pw");
        let authzid = "REFUSED alice|AUTH PLAIN|AuthzidMismatch";
        check(format!("HELO h\r\nAUTH PLAIN {foreign}\r\n"), &["250 mx.example.net\r\n", authzid, DENY], "");
        check(
            format!("HELO h\r\nAUTH PLAIN\r\n{foreign}\r\nNOOP\r\n"),
            &["250 mx.example.net\r\n", "334 \r\n", authzid, DENY, "250 2.0.0 OK\r\n"],
            "",
        );
        check(
            format!("HELO h\r\nAUTH PLAIN {}\r\n", b64("\0alice\0")),
            &["250 mx.example.net\r\n", "REFUSED alice|AUTH PLAIN|EmptyPassword", DENY],
            "",
        );
        check(
            format!("HELO h\r\nAUTH LOGIN {}\r\n{}\r\n", b64("a\x07b"), b64("pw")),
            &["250 mx.example.net\r\n", "334 UGFzc3dvcmQ6\r\n", "REFUSED -|AUTH LOGIN|InvalidUserName", DENY],
            "",
        );
        let nul = b64("\0al\0ice\0pw");
        check(
            format!("HELO h\r\nAUTH PLAIN {nul}\r\n"),
            &["250 mx.example.net\r\n", "501 5.5.2 Invalid SASL response\r\n"],
            "",
        );
        let login_nul = b64("al\0ice");
        check(
            format!("HELO h\r\nAUTH LOGIN {login_nul}\r\n"),
            &["250 mx.example.net\r\n", "501 5.5.2 Invalid SASL response\r\n"],
            "",
        );
    }

    #[test]
    fn decisions_and_pipelined_bytes() {
        let plain = b64("\0a\0b");
        let input = format!("EHLO c\r\nAUTH PLAIN {plain}\r\nMAIL FROM:<a@b>\r\n");
        let (log, rest) = run(make().as_mut(), input.as_bytes(), Decision::Accept(None));
        assert_eq!(log[2], "235 2.7.0 Authentication successful\r\n");
        assert_eq!(rest, b"MAIL FROM:<a@b>\r\n");
        let (log, rest) = run(make().as_mut(), input.as_bytes(), Decision::Unavailable);
        assert_eq!(log[2], "454 4.7.0 Mail service temporarily unavailable, try again later\r\n");
        assert_eq!(log[3], "530 5.7.0 Authentication required\r\n");
        assert!(rest.is_empty());
    }

    #[test]
    fn long_lines_and_bad_commands_close() {
        let long = format!("EHLO {}", "a".repeat(300));
        check(&long, &["CLOSE 500 5.5.2 Line too long\r\n"], &long);
        let input = "FROB\r\n".repeat(MAX_BAD_COMMANDS as usize + 1);
        let (log, rest) = run(make().as_mut(), input.as_bytes(), Decision::Deny);
        assert_eq!(log.len(), MAX_BAD_COMMANDS as usize);
        assert_eq!(log.last().unwrap(), "CLOSE 421 4.7.0 mx.example.net Too many invalid commands\r\n");
        assert_eq!(rest, b"FROB\r\n");
    }

    #[test]
    fn session_goodbyes() {
        let d = make();
        assert_eq!(d.timed_out(), b"421 4.4.2 mx.example.net Timeout; login took too long\r\n");
        assert_eq!(d.shutting_down(), b"421 4.3.2 mx.example.net Server shutting down\r\n");
    }

    #[test]
    fn garbage_never_panics() {
        let plain = b64("\0a\0b");
        let words: &[&[u8]] = &[
            b"EHLO x",
            b"HELO ",
            b"AUTH ",
            b"PLAIN",
            b"LOGIN ",
            b"MAIL ",
            b"\r\n",
            b"\n",
            b" ",
            b"*",
            b"=",
            b"\0",
            b"\r",
            b"\xff",
            b"a",
            plain.as_bytes(),
            b"YQ==",
        ];
        fuzz(&make, words, 2);
    }

    fn make_pre_tls() -> Box<dyn Dialogue> {
        Box::new(SmtpDialogue::pre_tls(&settings()))
    }

    fn check_pre_tls(input: impl AsRef<[u8]>, expected: &[&str], leftover: &str) {
        testing::check(&make_pre_tls, input, expected, leftover);
    }

    const PRE_TLS_EHLO: &str = "250-mx.example.net\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n";
    const TLS_FIRST: &str = "530 5.7.0 Must issue a STARTTLS command first\r\n";
    const GO: &str = "STARTTLS 220 2.0.0 Ready to start TLS\r\n";

    #[test]
    fn before_tls_only_the_upgrade_is_offered() {
        assert_eq!(make_pre_tls().greeting(), b"220 mx.example.net ESMTP Postern\r\n");
        check_pre_tls("EHLO client.example\r\n", &[PRE_TLS_EHLO], "");
        check_pre_tls("HELO client.example\r\n", &["250 mx.example.net\r\n"], "");
        check_pre_tls("RSET\r\nnoop\r\n", &["250 2.0.0 OK\r\n", "250 2.0.0 OK\r\n"], "");
        check_pre_tls("QUIT\r\nNOOP\r\n", &["CLOSE 221 2.0.0 Bye\r\n"], "NOOP\r\n");
        check_pre_tls("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", &[TLS_FIRST, TLS_FIRST], "");
        check_pre_tls(
            "VRFY root\r\nFROB\r\n",
            &["502 5.5.1 Command not implemented\r\n", "500 5.5.2 Command unrecognized\r\n"],
            "",
        );
        check_pre_tls("STARTTLS now\r\n", &["501 5.5.4 Syntax: STARTTLS\r\n"], "");
        check_pre_tls("EHLO c\r\nstarttls\r\n", &[PRE_TLS_EHLO, GO], "");
        check_pre_tls("STARTTLS\n", &[GO], "");
    }

    #[test]
    fn auth_before_tls_is_refused_unread() {
        let refused = "REFUSED -|AUTH|TlsRequired";
        let plain = b64("\0alice@example.com\0secret");
        check_pre_tls(
            format!("EHLO c\r\nAUTH PLAIN {plain}\r\nAUTH LOGIN\r\nNOOP\r\n"),
            &[PRE_TLS_EHLO, refused, TLS_FIRST, refused, TLS_FIRST, "250 2.0.0 OK\r\n"],
            "",
        );
        check_pre_tls("AUTH PLAIN\r\n", &[refused, TLS_FIRST], "");
    }

    #[test]
    fn commands_pipelined_after_starttls_are_left_unexecuted() {
        let plain = b64("\0alice@example.com\0pw");
        check_pre_tls(
            format!("EHLO c\r\nSTARTTLS\r\nAUTH PLAIN {plain}\r\nMAIL FROM:<a@b>\r\n"),
            &[PRE_TLS_EHLO, GO],
            &format!("AUTH PLAIN {plain}\r\nMAIL FROM:<a@b>\r\n"),
        );
        let mut d = make_pre_tls();
        run(d.as_mut(), b"STARTTLS\r\n", Decision::Deny);
        let mut more = BytesMut::from(&b"EHLO c\r\n"[..]);
        assert!(matches!(d.step(&mut more), Step::NeedMore));
        assert_eq!(&more[..], b"EHLO c\r\n");
    }

    #[test]
    fn pre_tls_garbage_never_panics() {
        let words: &[&[u8]] = &[
            b"EHLO c",
            b"STARTTLS",
            b"AUTH ",
            b"PLAIN",
            b"MAIL FROM:<a@b>",
            b"QUIT",
            b"x",
            b" ",
            b"\r\n",
            b"\n",
            b"\0",
        ];
        fuzz(&make_pre_tls, words, 7);
    }
}
