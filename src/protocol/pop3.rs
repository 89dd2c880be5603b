//! POP3 pre-login dialogue (RFC 1939, CAPA from RFC 2449, AUTH from RFC 5034).
//!
//! Only the AUTHORIZATION state is served here: `USER`/`PASS`, `AUTH PLAIN|LOGIN`,
//! `CAPA`, `QUIT`. Everything else is refused until the client has logged in.

use bytes::BytesMut;

use super::fields;
use super::line::{self, BadCommands, LineState, NextLine};
use super::sasl::{Mechanism, SaslExchange, SaslStep};
use super::{CredentialFault, Credentials, DENIAL_TEXT, Dialogue, DialogueSettings, Rejected, Step, UpstreamInfo};
use crate::secret::Secret;

/// Gmail's POP3 "recent mode" marker in front of the user name.
const RECENT_PREFIX: &str = "recent:";

const CAPABILITIES: &[u8] = b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN LOGIN\r\n\
RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION Postern\r\n.\r\n";

/// `CAPA` before TLS on a STARTTLS listener: the upgrade, and no way to log in (RFC 2595).
const PRE_TLS_CAPABILITIES: &[u8] = b"+OK Capability list follows\r\nSTLS\r\n\
RESP-CODES\r\nAUTH-RESP-CODE\r\nIMPLEMENTATION Postern\r\n.\r\n";

/// The answer to `USER`, `PASS` or `AUTH` before TLS.
const TLS_REQUIRED: &[u8] = b"-ERR [AUTH] Use STLS first; no login before TLS\r\n";

/// POP3 pre-login state machine.
pub struct Pop3Dialogue {
    max_line: usize,
    state: LineState,
    bad: BadCommands,
    /// The user name from `USER`, waiting for `PASS`.
    user: Option<String>,
    /// Before TLS on a STARTTLS listener: only `CAPA`, `STLS` and `QUIT` run.
    pre_tls: bool,
}

impl Pop3Dialogue {
    /// A dialogue for a new connection.
    pub fn new(settings: &DialogueSettings) -> Self {
        Self {
            max_line: settings.max_line,
            state: LineState::Command,
            bad: BadCommands::default(),
            user: None,
            pre_tls: false,
        }
    }

    /// A dialogue for a new connection on a STARTTLS listener, before TLS; it ends with
    /// [`Step::StartTls`] and the session goes on over TLS with [`Pop3Dialogue::new`].
    pub fn pre_tls(settings: &DialogueSettings) -> Self {
        Self { pre_tls: true, ..Self::new(settings) }
    }

    /// A command before TLS. Logins are refused unread; `STLS` consumes its own line
    /// only, so whatever the client sent after it stays for the session to discard.
    fn command_pre_tls(&mut self, line: &[u8]) -> Step {
        let (verb, rest) = line::split_verb(line);
        match verb.to_ascii_uppercase().as_slice() {
            b"CAPA" => Step::Reply(PRE_TLS_CAPABILITIES.to_vec()),
            b"STLS" if rest.is_empty() => {
                self.state = LineState::Finished;
                Step::StartTls(b"+OK Begin TLS negotiation\r\n".to_vec())
            }
            b"STLS" => self.fail("-ERR Syntax: STLS\r\n"),
            b"QUIT" => {
                self.state = LineState::Finished;
                Step::Close(b"+OK Bye\r\n".to_vec())
            }
            b"AUTH" if line::words(rest).next().is_none() => self.fail("-ERR Use STLS first\r\n"),
            verb @ (b"USER" | b"PASS" | b"AUTH" | b"APOP") => {
                let mechanism = match verb {
                    b"AUTH" => "AUTH",
                    b"APOP" => "APOP",
                    _ => "USER/PASS",
                };
                self.state = LineState::Deciding;
                Step::Refused(Rejected { user: None, mechanism, fault: CredentialFault::TlsRequired })
            }
            _ => self.fail("-ERR Use STLS first\r\n"),
        }
    }

    /// Answers a failed or invalid command, closing once too many have been seen.
    fn fail(&mut self, reply: &str) -> Step {
        if self.bad.record() {
            self.state = LineState::Finished;
            return Step::Close(b"-ERR Too many invalid commands\r\n".to_vec());
        }
        Step::Reply(reply.as_bytes().to_vec())
    }

    fn login(&mut self, user: String, password: Secret, mechanism: &'static str) -> Step {
        let Some((user, upstream_prefix)) = split_recent(user) else {
            return self.refuse(None, mechanism, CredentialFault::InvalidUserName);
        };
        self.state = LineState::Deciding;
        Step::Login(Credentials { user, upstream_prefix, password, mechanism, client_hello: None })
    }

    /// Hands credentials refused by the dialogue itself to the session, which counts the
    /// refusal and answers with [`Dialogue::denied`]. The user loses any `recent:` prefix.
    fn refuse(&mut self, user: Option<String>, mechanism: &'static str, fault: CredentialFault) -> Step {
        let (user, fault) = match user.map(split_recent) {
            Some(Some((user, _))) => (Some(user), fault),
            Some(None) => (None, CredentialFault::InvalidUserName),
            None => (None, fault),
        };
        self.state = LineState::Deciding;
        Step::Refused(Rejected { user, mechanism, fault })
    }

    fn command(&mut self, line: &[u8]) -> Step {
        let (verb, rest) = line::split_verb(line);
        match verb.to_ascii_uppercase().as_slice() {
            b"USER" => match fields::user_name(rest) {
                Some(user) => {
                    self.user = Some(user);
                    Step::Reply(b"+OK\r\n".to_vec())
                }
                None => self.fail("-ERR Invalid user name\r\n"),
            },
            b"PASS" => match (self.user.take(), fields::password(rest)) {
                (None, _) => self.fail("-ERR USER first\r\n"),
                (Some(user), None) if rest.is_empty() => {
                    self.refuse(Some(user), "USER/PASS", CredentialFault::EmptyPassword)
                }
                (Some(_), None) => self.fail("-ERR Invalid password\r\n"),
                (Some(user), Some(password)) => self.login(user, password, "USER/PASS"),
            },
            b"AUTH" => self.auth(rest),
            b"CAPA" => Step::Reply(CAPABILITIES.to_vec()),
            b"QUIT" => {
                self.state = LineState::Finished;
                Step::Close(b"+OK Bye\r\n".to_vec())
            }
            b"APOP" => self.fail("-ERR APOP is not supported; use USER/PASS or AUTH PLAIN\r\n"),
            b"STLS" => self.fail("-ERR TLS is already active\r\n"),
            b"NOOP" | b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"RSET" | b"TOP" | b"UIDL" | b"LAST" => {
                self.fail("-ERR Log in first\r\n")
            }
            _ => self.fail("-ERR Unknown command\r\n"),
        }
    }

    fn auth(&mut self, args: &[u8]) -> Step {
        let mut words = line::words(args);
        let (mechanism, initial) = match (words.next(), words.next(), words.next()) {
            (None, _, _) => return Step::Reply(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n".to_vec()),
            (Some(mechanism), initial, None) => (mechanism, initial),
            _ => return self.fail("-ERR Syntax: AUTH mechanism [initial-response]\r\n"),
        };
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            return self.fail("-ERR Unsupported authentication mechanism\r\n");
        };
        let (exchange, step) = SaslExchange::start(mechanism, initial);
        self.sasl(exchange, step)
    }

    fn sasl(&mut self, exchange: SaslExchange, step: SaslStep) -> Step {
        match step {
            SaslStep::Challenge(challenge) => {
                self.state = LineState::Sasl(exchange);
                Step::Reply(format!("+ {challenge}\r\n").into_bytes())
            }
            SaslStep::Done { user, password } => self.login(user, password, sasl_mechanism(&exchange)),
            SaslStep::Refused { user, fault } => self.refuse(user, sasl_mechanism(&exchange), fault),
            SaslStep::Cancelled => self.fail("-ERR Authentication cancelled\r\n"),
            SaslStep::Invalid(_) => self.fail("-ERR Invalid SASL response\r\n"),
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

/// Splits off Gmail's `recent:` prefix (any case): (user, upstream prefix).
fn split_recent(user: String) -> Option<(String, String)> {
    let n = RECENT_PREFIX.len();
    let has_prefix = user.as_bytes().get(..n).is_some_and(|p| p.eq_ignore_ascii_case(RECENT_PREFIX.as_bytes()));
    if !has_prefix {
        return Some((user, String::new()));
    }
    let rest = user.get(n..)?.trim();
    (!rest.is_empty()).then(|| (rest.to_owned(), RECENT_PREFIX.to_owned()))
}

impl Dialogue for Pop3Dialogue {
    fn greeting(&mut self) -> Vec<u8> {
        b"+OK Postern ready.\r\n".to_vec()
    }

    fn step(&mut self, input: &mut BytesMut) -> Step {
        match self.state.next(input, self.max_line, b"-ERR Line too long\r\n") {
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
            return TLS_REQUIRED.to_vec();
        }
        format!("-ERR [AUTH] {DENIAL_TEXT}\r\n").into_bytes()
    }

    fn unavailable(&mut self) -> Vec<u8> {
        self.state.refused();
        b"-ERR [SYS/TEMP] Mail service temporarily unavailable, try again later\r\n".to_vec()
    }

    fn accepted(&mut self, _upstream: &UpstreamInfo) -> Vec<u8> {
        self.state = LineState::Finished;
        b"+OK Logged in.\r\n".to_vec()
    }

    fn timed_out(&self) -> Vec<u8> {
        b"-ERR Autologout; login took too long\r\n".to_vec()
    }

    fn shutting_down(&self) -> Vec<u8> {
        b"-ERR Server shutting down\r\n".to_vec()
    }

    fn too_many_connections(&self) -> Vec<u8> {
        b"-ERR [SYS/TEMP] Too many connections from your address; try again later\r\n".to_vec()
    }

    fn busy(&self) -> Vec<u8> {
        b"-ERR [SYS/TEMP] Server busy; try again later\r\n".to_vec()
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::protocol::limits::MAX_BAD_COMMANDS;
    use crate::protocol::line::testing::{self, Decision, b64, fuzz, run, run_all_splits};

    fn settings() -> DialogueSettings {
        DialogueSettings { max_line: 200, ..DialogueSettings::default() }
    }

    fn make() -> Box<dyn Dialogue> {
        Box::new(Pop3Dialogue::new(&settings()))
    }

    fn check(input: impl AsRef<[u8]>, expected: &[&str], leftover: &str) {
        testing::check(&make, input, expected, leftover);
    }

    const DENY: &str = "-ERR [AUTH] You are not allowed to access this server\r\n";

    #[test]
    fn greeting_and_simple_commands() {
        assert_eq!(make().greeting(), b"+OK Postern ready.\r\n");
        check("CAPA\r\n", &[std::str::from_utf8(CAPABILITIES).unwrap()], "");
        check("capa\n", &[std::str::from_utf8(CAPABILITIES).unwrap()], "");
        check("AUTH\r\n", &["+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"], "");
        check("QUIT\r\nUSER x\r\n", &["CLOSE +OK Bye\r\n"], "USER x\r\n");
        check("STAT\r\n", &["-ERR Log in first\r\n"], "");
        check("RETR 1\r\n", &["-ERR Log in first\r\n"], "");
        check("XYZZY\r\n", &["-ERR Unknown command\r\n"], "");
        check("STLS\r\n", &["-ERR TLS is already active\r\n"], "");
        check("APOP a b\r\n", &["-ERR APOP is not supported; use USER/PASS or AUTH PLAIN\r\n"], "");
        check("PASS x\r\n", &["-ERR USER first\r\n"], "");
        check("AUTH CRAM-MD5\r\n", &["-ERR Unsupported authentication mechanism\r\n"], "");
    }

    #[test]
    fn user_pass_keeps_spaces_and_pipelined_bytes() {
        check(
            "USER alice@example.com\r\nPASS pä ss\"w\\rd \r\nSTAT\r\n",
            &["+OK\r\n", "LOGIN alice@example.com||pä ss\"w\\rd |USER/PASS|-", DENY, "-ERR Log in first\r\n"],
            "",
        );
        let (log, rest) = run(make().as_mut(), b"USER a\r\nPASS b\r\nLIST\r\n", Decision::Accept(None));
        assert_eq!(log.last().unwrap(), "+OK Logged in.\r\n");
        assert_eq!(rest, b"LIST\r\n");
    }

    #[test]
    fn retry_after_denial_and_unavailable() {
        let input = "USER a\r\nPASS b\r\nPASS c\r\nUSER a\r\nPASS c\r\n";
        let (log, _) = run_all_splits(&make, input.as_bytes(), Decision::Unavailable);
        let unavailable = "-ERR [SYS/TEMP] Mail service temporarily unavailable, try again later\r\n";
        assert_eq!(
            log,
            [
                "+OK\r\n",
                "LOGIN a||b|USER/PASS|-",
                unavailable,
                "-ERR USER first\r\n",
                "+OK\r\n",
                "LOGIN a||c|USER/PASS|-",
                unavailable,
            ]
        );
    }

    #[test]
    fn recent_mode() {
        check(
            "USER Recent:alice@example.com\r\nPASS pw\r\n",
            &["+OK\r\n", "LOGIN alice@example.com|recent:|pw|USER/PASS|-", DENY],
            "",
        );
        let ir = b64("\0RECENT:bob@example.com\0pw");
        check(format!("AUTH PLAIN {ir}\r\n"), &["LOGIN bob@example.com|recent:|pw|AUTH PLAIN|-", DENY], "");
        check("USER recent:\r\nPASS pw\r\n", &["+OK\r\n", "REFUSED -|USER/PASS|InvalidUserName", DENY], "");
    }

    #[test]
    fn auth_plain_and_login() {
        let pw = "pä ss\"w\\rd";
        let plain = b64(&format!("\0alice\0{pw}"));
        let login_line = format!("LOGIN alice||{pw}|AUTH LOGIN|-");
        check(
            format!("AUTH PLAIN {plain}\r\nNOOP\r\n"),
            &[&format!("LOGIN alice||{pw}|AUTH PLAIN|-"), DENY, "-ERR Log in first\r\n"],
            "",
        );
        check(format!("AUTH PLAIN\r\n{plain}\r\n"), &["+ \r\n", &format!("LOGIN alice||{pw}|AUTH PLAIN|-"), DENY], "");
        check(
            format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64("alice"), b64(pw)),
            &["+ VXNlcm5hbWU6\r\n", "+ UGFzc3dvcmQ6\r\n", &login_line, DENY],
            "",
        );
        check(
            format!("auth login {}\r\n{}\r\n", b64("alice"), b64(pw)),
            &["+ UGFzc3dvcmQ6\r\n", &login_line, DENY],
            "",
        );
        check("AUTH PLAIN\r\n*\r\n", &["+ \r\n", "-ERR Authentication cancelled\r\n"], "");
        check("AUTH PLAIN ###\r\n", &["-ERR Invalid SASL response\r\n"], "");
        check("AUTH PLAIN =\r\n", &["-ERR Invalid SASL response\r\n"], "");
        let foreign = b64("bob\0alice\0pw");
        let authzid = "REFUSED alice|AUTH PLAIN|AuthzidMismatch";
        check(
            format!("AUTH PLAIN {foreign}\r\nCAPA\r\n"),
            &[authzid, DENY, std::str::from_utf8(CAPABILITIES).unwrap()],
            "",
        );
        check(format!("AUTH PLAIN\r\n{foreign}\r\n"), &["+ \r\n", authzid, DENY], "");
        let recent = b64("bob\0recent:alice\0pw");
        check(format!("AUTH PLAIN {recent}\r\n"), &[authzid, DENY], "");
        check(format!("AUTH PLAIN {}\r\n", b64("\0alice\0")), &["REFUSED alice|AUTH PLAIN|EmptyPassword", DENY], "");
        check(
            format!("AUTH LOGIN {}\r\n{}\r\n", b64("alice"), b64("")),
            &["+ UGFzc3dvcmQ6\r\n", "REFUSED alice|AUTH LOGIN|EmptyPassword", DENY],
            "",
        );
    }

    #[test]
    fn hostile_fields_are_refused() {
        check("USER a\0b\r\n", &["-ERR Invalid user name\r\n"], "");
        check(b"USER \xc3\r\n", &["-ERR Invalid user name\r\n"], "");
        check("USER a\r\nPASS a\rb\r\n", &["+OK\r\n", "-ERR Invalid password\r\n"], "");
        check("USER a\r\nPASS\r\n", &["+OK\r\n", "REFUSED a|USER/PASS|EmptyPassword", DENY], "");
        check("USER recent:a\r\nPASS \r\n", &["+OK\r\n", "REFUSED a|USER/PASS|EmptyPassword", DENY], "");
        let nul = b64("\0al\0ice\0pw");
        check(format!("AUTH PLAIN {nul}\r\n"), &["-ERR Invalid SASL response\r\n"], "");
    }

    #[test]
    fn long_lines_and_bad_commands_close() {
        let long = format!("USER {}\r\n", "a".repeat(300));
        check(&long, &["CLOSE -ERR Line too long\r\n"], &long);
        let input = "STAT\r\n".repeat(MAX_BAD_COMMANDS as usize + 1);
        let (log, rest) = run(make().as_mut(), input.as_bytes(), Decision::Deny);
        assert_eq!(log.len(), MAX_BAD_COMMANDS as usize);
        assert_eq!(log.last().unwrap(), "CLOSE -ERR Too many invalid commands\r\n");
        assert_eq!(rest, b"STAT\r\n");
    }

    #[test]
    fn session_goodbyes() {
        let d = make();
        assert_eq!(d.timed_out(), b"-ERR Autologout; login took too long\r\n");
        assert_eq!(d.shutting_down(), b"-ERR Server shutting down\r\n");
    }

    #[test]
    fn garbage_never_panics() {
        let plain = b64("\0a\0b");
        let words: &[&[u8]] = &[
            b"USER ",
            b"PASS ",
            b"AUTH ",
            b"PLAIN",
            b"LOGIN ",
            b"\r\n",
            b"\n",
            b" ",
            b"*",
            b"=",
            b"recent:",
            b"\0",
            b"\r",
            b"\xff",
            b"a",
            plain.as_bytes(),
            b"YQ==",
        ];
        fuzz(&make, words, 1);
    }

    fn make_pre_tls() -> Box<dyn Dialogue> {
        Box::new(Pop3Dialogue::pre_tls(&settings()))
    }

    fn check_pre_tls(input: impl AsRef<[u8]>, expected: &[&str], leftover: &str) {
        testing::check(&make_pre_tls, input, expected, leftover);
    }

    const TLS_FIRST: &str = "-ERR [AUTH] Use STLS first; no login before TLS\r\n";

    #[test]
    fn before_tls_only_the_upgrade_is_offered() {
        assert_eq!(make_pre_tls().greeting(), b"+OK Postern ready.\r\n");
        let capa = std::str::from_utf8(PRE_TLS_CAPABILITIES).unwrap();
        assert!(capa.contains("\r\nSTLS\r\n") && !capa.contains("SASL") && !capa.contains("USER"));
        check_pre_tls("CAPA\r\n", &[capa], "");
        check_pre_tls("QUIT\r\nCAPA\r\n", &["CLOSE +OK Bye\r\n"], "CAPA\r\n");
        check_pre_tls("NOOP\r\nSTAT\r\nAUTH\r\n", &["-ERR Use STLS first\r\n"; 3], "");
        check_pre_tls("STLS x\r\n", &["-ERR Syntax: STLS\r\n"], "");
        check_pre_tls("capa\nstls\n", &[capa, "STARTTLS +OK Begin TLS negotiation\r\n"], "");
    }

    #[test]
    fn logins_before_tls_are_refused_unread() {
        let refused = |mechanism: &str| format!("REFUSED -|{mechanism}|TlsRequired");
        check_pre_tls(
            format!("USER alice@example.com\r\nPASS secret\r\nAUTH PLAIN {}\r\n", b64("\0a\0b")),
            &[&refused("USER/PASS"), TLS_FIRST, &refused("USER/PASS"), TLS_FIRST, &refused("AUTH"), TLS_FIRST],
            "",
        );
        // No SASL exchange starts: the next line is a command again.
        check_pre_tls(
            "AUTH LOGIN\r\nCAPA\r\n",
            &[&refused("AUTH"), TLS_FIRST, std::str::from_utf8(PRE_TLS_CAPABILITIES).unwrap()],
            "",
        );
        check_pre_tls("APOP a b\r\n", &[&refused("APOP"), TLS_FIRST], "");
    }

    #[test]
    fn commands_pipelined_after_stls_are_left_unexecuted() {
        check_pre_tls(
            "STLS\r\nUSER alice@example.com\r\nPASS pw\r\n",
            &["STARTTLS +OK Begin TLS negotiation\r\n"],
            "USER alice@example.com\r\nPASS pw\r\n",
        );
        let mut d = make_pre_tls();
        run(d.as_mut(), b"STLS\r\n", Decision::Deny);
        let mut more = BytesMut::from(&b"CAPA\r\n"[..]);
        assert!(matches!(d.step(&mut more), Step::NeedMore));
        assert_eq!(&more[..], b"CAPA\r\n");
    }

    #[test]
    fn pre_tls_garbage_never_panics() {
        let words: &[&[u8]] =
            &[b"STLS", b"USER ", b"PASS ", b"AUTH ", b"PLAIN", b"CAPA", b"QUIT", b"x", b" ", b"\r\n", b"\n", b"\0"];
        fuzz(&make_pre_tls, words, 6);
    }
}
