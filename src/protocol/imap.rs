//! IMAP pre-login dialogue (the not-authenticated state of RFC 3501 / RFC 9051), plus the
//! string encoding Postern needs to log in upstream.
//!
//! A command may span several lines when it carries literals (`{n}` synchronizing,
//! `{n+}` LITERAL+); its text and literal bytes are assembled into tokens before it is
//! executed, within a per-command budget of `max_line` text bytes and `max_literal`
//! literal bytes.

use bytes::BytesMut;
use zeroize::{Zeroize, Zeroizing};

use super::fields;
use super::line::{self, BadCommands, Framed};
use super::sasl::{Mechanism, SaslExchange, SaslStep};
use super::{CredentialFault, Credentials, DENIAL_TEXT, Dialogue, DialogueSettings, Rejected, Step, UpstreamInfo};

/// What Postern announces before login.
const CAPABILITIES: &str = "IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN";

/// What Postern announces before TLS on a STARTTLS listener: the upgrade, and that no
/// login is possible until then (RFC 3501 section 6.2.1, 7.2.1).
const PRE_TLS_CAPABILITIES: &str = "IMAP4rev1 STARTTLS LOGINDISABLED";

/// The answer to `LOGIN` or `AUTHENTICATE` before TLS (RFC 5530 `PRIVACYREQUIRED`).
const TLS_REQUIRED_TEXT: &str = "NO [PRIVACYREQUIRED] Use STARTTLS first; no login before TLS";

/// Whether `b` may appear in an `astring` atom (ASTRING-CHAR of RFC 3501).
fn is_astring_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
}

/// Whether `b` may appear in a command tag: ASTRING-CHAR except `+`.
fn is_tag_char(b: u8) -> bool {
    is_astring_char(b) && b != b'+'
}

/// How a value must be written as an IMAP `astring` on the upstream connection.
///
/// Atoms and quoted strings can be sent at once. Anything else (8-bit text, which
/// IMAP4rev1 servers need not accept in quoted strings, or CR/LF) must go as a literal:
/// send [`literal_header`], wait for the server's `+` continuation unless it announced
/// LITERAL+, then send the bytes. Values with NUL cannot be sent at all; dialogue-made
/// credentials never contain NUL.
pub enum Astring<'a> {
    /// Ready-to-send bytes: an atom, or a quoted string with `"` and `\` escaped.
    /// Wiped on drop, as it is usually a password.
    Inline(Zeroizing<Vec<u8>>),
    /// The raw bytes of a literal, to be announced with [`literal_header`].
    Literal(&'a [u8]),
}

/// Encodes `value` as an IMAP `astring`, choosing atom, quoted string or literal.
pub fn encode_astring(value: &str) -> Astring<'_> {
    let bytes = value.as_bytes();
    if !bytes.is_empty() && bytes.iter().all(|&b| is_astring_char(b)) {
        return Astring::Inline(Zeroizing::new(bytes.to_vec()));
    }
    if bytes.iter().any(|&b| !b.is_ascii() || matches!(b, b'\0' | b'\r' | b'\n')) {
        return Astring::Literal(bytes);
    }
    let mut quoted = Zeroizing::new(Vec::with_capacity(bytes.len() + 2));
    quoted.push(b'"');
    for &b in bytes {
        if matches!(b, b'"' | b'\\') {
            quoted.push(b'\\');
        }
        quoted.push(b);
    }
    quoted.push(b'"');
    Astring::Inline(quoted)
}

/// The announcement of a `len`-byte literal: `{len}\r\n`, or `{len+}\r\n` when the
/// server supports LITERAL+ and no continuation must be awaited.
pub fn literal_header(len: usize, non_synchronizing: bool) -> String {
    let plus = if non_synchronizing { "+" } else { "" };
    format!("{{{len}{plus}}}\r\n")
}

/// One lexical element of a command, after the tag. String contents are wiped on drop.
enum Token {
    Atom(Zeroizing<Vec<u8>>),
    /// A quoted string or a literal.
    Str(Zeroizing<Vec<u8>>),
    Open,
    Shut,
}

impl Token {
    /// The bytes of an `astring` argument: an atom or a string.
    fn astring(&self) -> Option<&[u8]> {
        match self {
            Token::Atom(v) | Token::Str(v) => Some(v),
            _ => None,
        }
    }
}

/// How a line of command text ended.
enum LineEnd {
    /// The command is complete.
    Complete,
    /// A literal of `size` bytes follows (saturated on absurd announcements).
    Literal { size: u64, non_sync: bool },
}

/// Literal bytes still being read.
struct PendingLiteral {
    remaining: usize,
    /// What arrived so far. It grows with what arrives, never beyond the announced size
    /// (the room the session granted), so a client that announces a large literal and
    /// sends little of it costs little.
    data: Zeroizing<Vec<u8>>,
}

impl PendingLiteral {
    /// Appends `chunk` (at most `remaining` bytes). A full buffer is replaced by one twice
    /// as large, capped at the literal's size; the old one is wiped when dropped.
    fn take(&mut self, chunk: &[u8]) {
        let needed = self.data.len() + chunk.len();
        if needed > self.data.capacity() {
            let size = self.data.len() + self.remaining;
            let capacity = needed.max(2 * self.data.capacity()).max(LITERAL_FIRST_CHUNK).min(size);
            let mut grown = Zeroizing::new(Vec::with_capacity(capacity));
            grown.extend_from_slice(&self.data);
            self.data = grown;
        }
        self.data.extend_from_slice(chunk);
    }
}

/// The first buffer of a literal (or the whole literal, when smaller).
const LITERAL_FIRST_CHUNK: usize = 1024;

/// A command being assembled across literals.
struct Command {
    /// None when the line did not start with a valid tag: errors then answer with `*`.
    tag: Option<Vec<u8>>,
    tokens: Vec<Token>,
    /// The next token must be preceded by a space (or be `)`).
    need_space: bool,
    /// The first syntax error; the rest of the command is then only skipped.
    error: Option<&'static str>,
    text_used: usize,
    literal_used: usize,
    /// Bytes allocated for the command's literals: those the session found room for.
    held: usize,
    /// A literal was refused for want of room: the command is answered `NO [LIMIT]`.
    limited: bool,
    literal: Option<PendingLiteral>,
}

impl Command {
    /// Starts a command from its first line (`used` bytes of input, terminator included).
    fn start(line: &[u8], used: usize) -> (Self, LineEnd) {
        let (tag, rest) = line::split_verb(line);
        let valid_tag = !tag.is_empty() && tag.iter().all(|&b| is_tag_char(b));
        let mut command = Command {
            tag: valid_tag.then(|| tag.to_vec()),
            tokens: Vec::new(),
            need_space: false,
            error: (!valid_tag).then_some("Invalid tag"),
            text_used: used,
            literal_used: 0,
            held: 0,
            limited: false,
            literal: None,
        };
        let end = command.feed(if valid_tag { rest } else { line });
        (command, end)
    }

    /// Tokenizes one line of text. After an error, only looks for a trailing literal
    /// announcement, so that the literal's bytes can be skipped.
    fn feed(&mut self, text: &[u8]) -> LineEnd {
        if self.error.is_none() {
            match self.tokenize(text) {
                Ok(end) => return end,
                Err(e) => self.error = Some(e),
            }
        }
        trailing_literal(text).unwrap_or(LineEnd::Complete)
    }

    fn tokenize(&mut self, text: &[u8]) -> Result<LineEnd, &'static str> {
        let mut i = 0;
        loop {
            let start = i;
            while text.get(i) == Some(&b' ') {
                i += 1;
            }
            let Some(&c) = text.get(i) else {
                return Ok(LineEnd::Complete);
            };
            if !matches!(c, b'(' | b')' | b'"' | b'{') && !is_astring_char(c) {
                return Err("Invalid character");
            }
            if self.need_space && i == start && c != b')' {
                return Err("Missing space between arguments");
            }
            match c {
                b'(' => {
                    self.tokens.push(Token::Open);
                    self.need_space = false;
                    i += 1;
                }
                b')' => {
                    self.tokens.push(Token::Shut);
                    self.need_space = true;
                    i += 1;
                }
                b'"' => {
                    let (value, next) = quoted(text, i + 1)?;
                    self.tokens.push(Token::Str(value));
                    self.need_space = true;
                    i = next;
                }
                b'{' => {
                    return literal_marker(&text[i + 1..]).ok_or("Invalid literal");
                }
                _ => {
                    let len = text[i..].iter().take_while(|&&b| is_astring_char(b)).count();
                    self.tokens.push(Token::Atom(Zeroizing::new(text[i..i + len].to_vec())));
                    self.need_space = true;
                    i += len;
                }
            }
        }
    }
}

/// Parses a quoted string whose opening quote is just before `start`: only `\"` and
/// `\\` escapes, no NUL, CR or LF. Returns the value and the index after the closing quote.
fn quoted(text: &[u8], start: usize) -> Result<(Zeroizing<Vec<u8>>, usize), &'static str> {
    let mut value = Zeroizing::new(Vec::new());
    let mut i = start;
    loop {
        match text.get(i) {
            None => return Err("Unterminated quoted string"),
            Some(b'"') => return Ok((value, i + 1)),
            Some(b'\\') => match text.get(i + 1) {
                Some(&escaped @ (b'"' | b'\\')) => {
                    value.push(escaped);
                    i += 2;
                }
                _ => return Err("Invalid escape in quoted string"),
            },
            Some(b'\0' | b'\r' | b'\n') => return Err("Invalid character in quoted string"),
            Some(&b) => {
                value.push(b);
                i += 1;
            }
        }
    }
}

/// Parses `digits [+] }` that must end the line (the `{` already consumed).
fn literal_marker(rest: &[u8]) -> Option<LineEnd> {
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let non_sync = match &rest[digits..] {
        b"}" => false,
        b"+}" => true,
        _ => return None,
    };
    if digits == 0 {
        return None;
    }
    let size = rest[..digits].iter().fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')));
    Some(LineEnd::Literal { size, non_sync })
}

/// A literal announcement at the very end of `text`, if there is one.
fn trailing_literal(text: &[u8]) -> Option<LineEnd> {
    if text.last() != Some(&b'}') {
        return None;
    }
    let open = text.iter().rposition(|&b| b == b'{')?;
    literal_marker(&text[open + 1..])
}

enum State {
    Command,
    /// A command with literals is being read.
    Assembling(Box<Command>),
    /// A literal was announced; the session is finding room for it.
    Announced {
        cmd: Box<Command>,
        size: usize,
        non_sync: bool,
    },
    Sasl {
        tag: Vec<u8>,
        exchange: SaslExchange,
    },
    /// A login is with the session, which will call `denied`, `unavailable` or `accepted`.
    Deciding {
        tag: Vec<u8>,
    },
    /// Logged in or closing: nothing more is read.
    Finished,
}

/// IMAP pre-login state machine.
pub struct ImapDialogue {
    max_line: usize,
    max_literal: usize,
    state: State,
    bad: BadCommands,
    /// What the next step returns before reading input (the answer to a literal).
    pending: Option<Step>,
    /// Before TLS on a STARTTLS listener: only `CAPABILITY`, `NOOP`, `LOGOUT` and
    /// `STARTTLS` run, logins are refused, literals are not accepted.
    pre_tls: bool,
}

/// The answer to a command whose literal was refused for want of room.
const LIMIT_TEXT: &str = "NO [LIMIT] Server busy; literal refused, try again later";

/// `tag text\r\n`, with `*` for an unknown tag.
fn tagged(tag: Option<&[u8]>, text: &str) -> Vec<u8> {
    let mut reply = tag.unwrap_or(b"*").to_vec();
    reply.push(b' ');
    reply.extend_from_slice(text.as_bytes());
    reply.extend_from_slice(b"\r\n");
    reply
}

impl ImapDialogue {
    /// A dialogue for a new connection.
    pub fn new(settings: &DialogueSettings) -> Self {
        Self {
            max_line: settings.max_line,
            max_literal: settings.max_literal,
            state: State::Command,
            bad: BadCommands::default(),
            pending: None,
            pre_tls: false,
        }
    }

    /// A dialogue for a new connection on a STARTTLS listener, before TLS; it ends with
    /// [`Step::StartTls`] and the session goes on over TLS with [`ImapDialogue::new`].
    pub fn pre_tls(settings: &DialogueSettings) -> Self {
        Self { pre_tls: true, ..Self::new(settings) }
    }

    fn capabilities(&self) -> &'static str {
        if self.pre_tls { PRE_TLS_CAPABILITIES } else { CAPABILITIES }
    }

    /// Sends a failure reply, closing once too many commands have failed.
    fn fail(&mut self, mut reply: Vec<u8>) -> Step {
        if self.bad.record() {
            self.state = State::Finished;
            reply.extend_from_slice(b"* BYE Too many invalid commands\r\n");
            return Step::Close(reply);
        }
        self.state = State::Command;
        Step::Reply(reply)
    }

    fn bad(&mut self, tag: Option<&[u8]>, text: &str) -> Step {
        self.fail(tagged(tag, &format!("BAD {text}")))
    }

    fn close(&mut self, reply: &[u8]) -> Step {
        self.state = State::Finished;
        Step::Close(reply.to_vec())
    }

    fn read_command(&mut self, input: &mut BytesMut) -> Option<Step> {
        let before = input.len();
        match line::take_line(input, self.max_line) {
            Framed::Incomplete => {
                self.state = State::Command;
                Some(Step::NeedMore)
            }
            Framed::TooLong => Some(self.close(b"* BYE Line too long\r\n")),
            Framed::Line(text) => {
                let (command, end) = Command::start(&text, before - input.len());
                self.line_done(Box::new(command), end)
            }
        }
    }

    /// Reads literal bytes, then the next line of a command being assembled.
    fn continue_command(&mut self, mut cmd: Box<Command>, input: &mut BytesMut) -> Option<Step> {
        if let Some(literal) = &mut cmd.literal {
            let mut chunk = input.split_to(literal.remaining.min(input.len()));
            if cmd.error.is_none() {
                literal.take(&chunk);
            }
            chunk[..].zeroize();
            literal.remaining -= chunk.len();
            if literal.remaining > 0 {
                self.state = State::Assembling(cmd);
                return Some(Step::NeedMore);
            }
            if let Some(literal) = cmd.literal.take() {
                cmd.tokens.push(Token::Str(literal.data));
                cmd.need_space = true;
            }
        }
        let before = input.len();
        match line::take_line(input, self.max_line.saturating_sub(cmd.text_used)) {
            Framed::Incomplete => {
                self.state = State::Assembling(cmd);
                Some(Step::NeedMore)
            }
            Framed::TooLong => Some(self.close(b"* BYE Line too long\r\n")),
            Framed::Line(text) => {
                cmd.text_used += before - input.len();
                let end = cmd.feed(&text);
                self.line_done(cmd, end)
            }
        }
    }

    /// Acts on the end of a command line: run the command, or prepare for its literal.
    /// None means keep stepping.
    fn line_done(&mut self, mut cmd: Box<Command>, end: LineEnd) -> Option<Step> {
        let LineEnd::Literal { size, non_sync } = end else {
            return Some(match cmd.error {
                None if self.pre_tls => self.execute_pre_tls(cmd.tag.unwrap_or_default(), &cmd.tokens),
                Some(_) => self.refuse_command(&cmd),
                None => self.execute(cmd.tag.unwrap_or_default(), &cmd.tokens),
            });
        };
        let budget = self.max_literal.saturating_sub(cmd.literal_used);
        let size = match usize::try_from(size) {
            Ok(size) if size <= budget => size,
            // The bytes of a LITERAL+ literal are coming regardless; refusing to read
            // them leaves no way to find the next command.
            _ if non_sync => return Some(self.close(b"* BYE Literal too large\r\n")),
            _ => return Some(self.bad(cmd.tag.as_deref(), "Literal too large")),
        };
        if self.pre_tls {
            // Nothing before TLS needs one, and a literal is where a password would go:
            // a synchronizing one is refused before its bytes are sent, a LITERAL+ one
            // is skipped unread.
            cmd.error.get_or_insert("Literals are not accepted before STARTTLS");
        }
        if cmd.error.is_some() && !non_sync {
            // The client waits for a continuation that will not come: answer now.
            return Some(self.refuse_command(&cmd));
        }
        cmd.literal_used += size;
        if cmd.error.is_some() || size == 0 {
            // Skipped or empty: nothing to hold, so no room to ask for.
            return self.expect_literal(cmd, size, non_sync, false);
        }
        self.state = State::Announced { cmd, size, non_sync };
        Some(Step::Literal(size))
    }

    /// Prepares to read a literal's bytes (keeping them when `keep`, skipping them when the
    /// command already failed); the continuation to send, if the client waits for one.
    fn expect_literal(&mut self, mut cmd: Box<Command>, size: usize, non_sync: bool, keep: bool) -> Option<Step> {
        // The room is granted for the whole literal; memory is taken as its bytes arrive.
        cmd.held += if keep { size } else { 0 };
        cmd.literal = Some(PendingLiteral { remaining: size, data: Zeroizing::new(Vec::new()) });
        self.state = State::Assembling(cmd);
        (!non_sync).then(|| Step::Reply(b"+ Ready for literal data\r\n".to_vec()))
    }

    /// The answer to a command that failed: `NO [LIMIT]` when a literal was refused for
    /// want of room, `BAD` with the first syntax error otherwise.
    fn refuse_command(&mut self, cmd: &Command) -> Step {
        match (cmd.limited, cmd.error) {
            (false, Some(error)) => self.bad(cmd.tag.as_deref(), error),
            _ => self.fail(tagged(cmd.tag.as_deref(), LIMIT_TEXT)),
        }
    }

    fn execute(&mut self, tag: Vec<u8>, tokens: &[Token]) -> Step {
        let Some((Token::Atom(name), args)) = tokens.split_first() else {
            return self.bad(Some(&tag), "Missing command");
        };
        let name = name.to_ascii_uppercase();
        match (name.as_slice(), args) {
            (b"CAPABILITY", []) => {
                let mut reply = format!("* CAPABILITY {}\r\n", self.capabilities()).into_bytes();
                reply.extend(tagged(Some(&tag), "OK CAPABILITY completed"));
                Step::Reply(reply)
            }
            (b"NOOP", []) => Step::Reply(tagged(Some(&tag), "OK NOOP completed")),
            (b"LOGOUT", []) => {
                let mut reply = b"* BYE Logging out\r\n".to_vec();
                reply.extend(tagged(Some(&tag), "OK LOGOUT completed"));
                self.close(&reply)
            }
            (b"ID", _) if is_id_argument(args) => {
                let mut reply = b"* ID (\"name\" \"Postern\")\r\n".to_vec();
                reply.extend(tagged(Some(&tag), "OK ID completed"));
                Step::Reply(reply)
            }
            (b"CAPABILITY" | b"NOOP" | b"LOGOUT" | b"ID", _) => self.bad(Some(&tag), "Invalid arguments"),
            (b"STARTTLS", _) => self.bad(Some(&tag), "TLS is already active"),
            (b"LOGIN", _) => self.login(tag, args),
            (b"AUTHENTICATE", _) => self.authenticate(tag, args),
            _ => self.bad(Some(&tag), "Log in first"),
        }
    }

    /// Runs a command before TLS. Logins are refused whatever their arguments, which are
    /// not looked at; `STARTTLS` consumes its own line only, so whatever the client sent
    /// after it stays in the input for the session to discard.
    fn execute_pre_tls(&mut self, tag: Vec<u8>, tokens: &[Token]) -> Step {
        let Some((Token::Atom(name), args)) = tokens.split_first() else {
            return self.bad(Some(&tag), "Missing command");
        };
        let name = name.to_ascii_uppercase();
        match (name.as_slice(), args) {
            (b"CAPABILITY" | b"NOOP" | b"LOGOUT", _) => self.execute(tag, tokens),
            (b"STARTTLS", []) => {
                self.state = State::Finished;
                Step::StartTls(tagged(Some(&tag), "OK Begin TLS negotiation now"))
            }
            (b"STARTTLS", _) => self.bad(Some(&tag), "Invalid arguments"),
            (b"LOGIN", _) => self.refuse(tag, None, "LOGIN", CredentialFault::TlsRequired),
            (b"AUTHENTICATE", _) => self.refuse(tag, None, "AUTHENTICATE", CredentialFault::TlsRequired),
            _ => self.bad(Some(&tag), "Use STARTTLS first"),
        }
    }

    fn login(&mut self, tag: Vec<u8>, args: &[Token]) -> Step {
        let [user, password] = args else {
            return self.bad(Some(&tag), "LOGIN needs a user name and a password");
        };
        let (Some(user), Some(raw_password)) = (user.astring(), password.astring()) else {
            return self.bad(Some(&tag), "Invalid user name or password");
        };
        let user = fields::user_name(user);
        let fault = match (user, fields::password(raw_password)) {
            (Some(user), Some(password)) => {
                self.state = State::Deciding { tag };
                return Step::Login(Credentials {
                    user,
                    upstream_prefix: String::new(),
                    password,
                    mechanism: "LOGIN",
                    client_hello: None,
                });
            }
            // A password no upstream syntax can carry is a malformed argument.
            (_, None) if !raw_password.is_empty() => return self.bad(Some(&tag), "Invalid user name or password"),
            (None, _) => (None, CredentialFault::InvalidUserName),
            (Some(user), None) => (Some(user), CredentialFault::EmptyPassword),
        };
        self.refuse(tag, fault.0, "LOGIN", fault.1)
    }

    /// Hands credentials refused by the dialogue itself to the session, which counts the
    /// refusal and answers with [`Dialogue::denied`].
    fn refuse(&mut self, tag: Vec<u8>, user: Option<String>, mechanism: &'static str, fault: CredentialFault) -> Step {
        self.state = State::Deciding { tag };
        Step::Refused(Rejected { user, mechanism, fault })
    }

    fn authenticate(&mut self, tag: Vec<u8>, args: &[Token]) -> Step {
        let (mechanism, initial) = match args {
            [Token::Atom(m)] => (m, None),
            [Token::Atom(m), Token::Atom(ir)] => (m, Some(ir.as_slice())),
            _ => return self.bad(Some(&tag), "Invalid AUTHENTICATE arguments"),
        };
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            let reply = tagged(Some(&tag), "NO [CANNOT] Unsupported authentication mechanism");
            return self.fail(reply);
        };
        let (exchange, step) = SaslExchange::start(mechanism, initial);
        self.sasl(tag, exchange, step)
    }

    fn read_sasl(&mut self, tag: Vec<u8>, mut exchange: SaslExchange, input: &mut BytesMut) -> Option<Step> {
        match line::take_line(input, self.max_line) {
            Framed::Incomplete => {
                self.state = State::Sasl { tag, exchange };
                Some(Step::NeedMore)
            }
            Framed::TooLong => Some(self.close(b"* BYE Line too long\r\n")),
            Framed::Line(text) => {
                let step = exchange.respond(&text);
                Some(self.sasl(tag, exchange, step))
            }
        }
    }

    fn sasl(&mut self, tag: Vec<u8>, exchange: SaslExchange, step: SaslStep) -> Step {
        match step {
            SaslStep::Challenge(challenge) => {
                self.state = State::Sasl { tag, exchange };
                Step::Reply(format!("+ {challenge}\r\n").into_bytes())
            }
            SaslStep::Done { user, password } => {
                self.state = State::Deciding { tag };
                Step::Login(Credentials {
                    user,
                    upstream_prefix: String::new(),
                    password,
                    mechanism: sasl_mechanism(&exchange),
                    client_hello: None,
                })
            }
            SaslStep::Refused { user, fault } => self.refuse(tag, user, sasl_mechanism(&exchange), fault),
            SaslStep::Cancelled => self.bad(Some(&tag), "Authentication cancelled"),
            SaslStep::Invalid(_) => self.bad(Some(&tag), "Invalid SASL response"),
        }
    }

    /// The tag of the pending login, or `*` if there is none; leaves the deciding state.
    fn pending_tag(&mut self, next: State) -> Vec<u8> {
        match std::mem::replace(&mut self.state, next) {
            State::Deciding { tag } => tag,
            other => {
                self.state = other;
                b"*".to_vec()
            }
        }
    }
}

/// The mechanism of an `AUTHENTICATE` login, for the audit log.
fn sasl_mechanism(exchange: &SaslExchange) -> &'static str {
    match exchange.mechanism() {
        Mechanism::Plain => "AUTHENTICATE PLAIN",
        Mechanism::Login => "AUTHENTICATE LOGIN",
    }
}

/// Whether ID's argument is `NIL` or a flat parenthesized list of strings.
fn is_id_argument(args: &[Token]) -> bool {
    match args {
        [Token::Atom(nil)] => nil.eq_ignore_ascii_case(b"NIL"),
        [Token::Open, items @ .., Token::Shut] => items.iter().all(|t| t.astring().is_some()),
        _ => false,
    }
}

impl Dialogue for ImapDialogue {
    fn greeting(&mut self) -> Vec<u8> {
        format!("* OK [CAPABILITY {}] Postern ready.\r\n", self.capabilities()).into_bytes()
    }

    fn step(&mut self, input: &mut BytesMut) -> Step {
        if let Some(step) = self.pending.take() {
            return step;
        }
        loop {
            // Each arm leaves the state for what comes next; finished commands fall back
            // to reading a new one.
            let step = match std::mem::replace(&mut self.state, State::Command) {
                parked @ (State::Finished | State::Deciding { .. }) => {
                    self.state = parked;
                    return Step::NeedMore;
                }
                State::Announced { cmd, size, non_sync } => {
                    // Still waiting for the session to answer `Step::Literal`.
                    self.state = State::Announced { cmd, size, non_sync };
                    return Step::Literal(size);
                }
                State::Command => self.read_command(input),
                State::Assembling(cmd) => self.continue_command(cmd, input),
                State::Sasl { tag, exchange } => self.read_sasl(tag, exchange, input),
            };
            if let Some(step) = step {
                return step;
            }
        }
    }

    fn denied(&mut self) -> Vec<u8> {
        let tag = self.pending_tag(State::Command);
        if self.pre_tls {
            // Before TLS the only refusal is that one.
            return tagged(Some(&tag), TLS_REQUIRED_TEXT);
        }
        let text = format!("NO [AUTHENTICATIONFAILED] {DENIAL_TEXT}");
        tagged(Some(&tag), &text)
    }

    fn unavailable(&mut self) -> Vec<u8> {
        let tag = self.pending_tag(State::Command);
        let text = "NO [UNAVAILABLE] Mail service temporarily unavailable, try again later";
        tagged(Some(&tag), text)
    }

    fn accepted(&mut self, upstream: &UpstreamInfo) -> Vec<u8> {
        let tag = self.pending_tag(State::Finished);
        self.state = State::Finished;
        // The list goes inside a response code: drop it rather than break the line.
        let capabilities = upstream
            .capabilities
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.contains(|ch: char| ch.is_control() || ch == ']'));
        match capabilities {
            Some(caps) => tagged(Some(&tag), &format!("OK [CAPABILITY {caps}] Logged in")),
            None => tagged(Some(&tag), "OK Logged in"),
        }
    }

    fn timed_out(&self) -> Vec<u8> {
        b"* BYE Autologout; login took too long\r\n".to_vec()
    }

    fn shutting_down(&self) -> Vec<u8> {
        b"* BYE Server shutting down\r\n".to_vec()
    }

    fn too_many_connections(&self) -> Vec<u8> {
        b"* BYE [UNAVAILABLE] Too many connections from your address; try again later\r\n".to_vec()
    }

    fn busy(&self) -> Vec<u8> {
        b"* BYE [UNAVAILABLE] Server busy; try again later\r\n".to_vec()
    }

    fn literal_room(&mut self, granted: bool) {
        if !matches!(self.state, State::Announced { .. }) {
            return;
        }
        let State::Announced { mut cmd, size, non_sync } = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        if granted {
            self.pending = self.expect_literal(cmd, size, non_sync, true);
            return;
        }
        cmd.limited = true;
        if non_sync {
            // The bytes are coming regardless: skip them, then answer the command.
            cmd.error.get_or_insert("Literal refused");
            self.pending = self.expect_literal(cmd, size, true, false);
        } else {
            self.pending = Some(self.refuse_command(&cmd));
        }
    }

    fn held(&self) -> usize {
        match &self.state {
            State::Assembling(cmd) | State::Announced { cmd, .. } => cmd.held,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::protocol::limits::MAX_BAD_COMMANDS;
    use crate::protocol::line::testing::{self, Decision, b64, fuzz, run};

    const PW: &str = "pä ss\"w\\rd";
    const DENY: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server\r\n";
    const READY: &str = "+ Ready for literal data\r\n";

    fn settings() -> DialogueSettings {
        DialogueSettings { max_line: 200, max_literal: 100, ..DialogueSettings::default() }
    }

    fn make() -> Box<dyn Dialogue> {
        Box::new(ImapDialogue::new(&settings()))
    }

    fn check(input: impl AsRef<[u8]>, expected: &[&str], leftover: &str) {
        testing::check(&make, input, expected, leftover);
    }

    fn login(user: &str, password: &str, mechanism: &str) -> String {
        format!("LOGIN {user}||{password}|{mechanism}|-")
    }

    #[test]
    fn greeting_and_simple_commands() {
        assert_eq!(
            make().greeting(),
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] Postern ready.\r\n"
        );
        let caps = "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN\r\n\
                    a1 OK CAPABILITY completed\r\n";
        check("a1 CAPABILITY\r\n", &[caps], "");
        check("a1 capability\n", &[caps], "");
        check("x NOOP\r\n", &["x OK NOOP completed\r\n"], "");
        check("x LOGOUT\r\ny NOOP\r\n", &["CLOSE * BYE Logging out\r\nx OK LOGOUT completed\r\n"], "y NOOP\r\n");
        let id = "* ID (\"name\" \"Postern\")\r\nx OK ID completed\r\n";
        check("x ID NIL\r\n", &[id], "");
        check("x ID (\"name\" \"Thunderbird\" \"version\" NIL)\r\n", &[id], "");
        check("x ID (\"name\" {3}\r\nabc)\r\n", &[READY, id], "");
        check("x ID (\"name\" {3+}\r\nabc)\r\n", &[id], "");
        check("x ID (\"name\"\r\n", &["x BAD Invalid arguments\r\n"], "");
        check("x ID ((NIL))\r\n", &["x BAD Invalid arguments\r\n"], "");
        check("x STARTTLS\r\n", &["x BAD TLS is already active\r\n"], "");
        check("x SELECT INBOX\r\n", &["x BAD Log in first\r\n"], "");
        check(
            "a NOOP\r\nb CAPABILITY\r\nc ID NIL\r\nd NOOP\r\n",
            &["a OK NOOP completed\r\n", &caps.replace("a1", "b"), &id.replace('x', "c"), "d OK NOOP completed\r\n"],
            "",
        );
        check("x NOOP extra\r\n", &["x BAD Invalid arguments\r\n"], "");
        check("x\r\n", &["x BAD Missing command\r\n"], "");
        check("x \"NOOP\"\r\n", &["x BAD Missing command\r\n"], "");
        check("+x NOOP\r\n", &["* BAD Invalid tag\r\n"], "");
        check("\r\n", &["* BAD Invalid tag\r\n"], "");
        check(b"\xff\xfe garbage\r\n", &["* BAD Invalid tag\r\n"], "");
    }

    #[test]
    fn login_argument_forms() {
        let quoted = "x LOGIN \"alice@example.com\" \"pä ss\\\"w\\\\rd\"\r\n";
        check(quoted, &[&login("alice@example.com", PW, "LOGIN"), &format!("x {DENY}")], "");
        check("x login alice secret\r\n", &[&login("alice", "secret", "LOGIN"), &format!("x {DENY}")], "");
        let empty = ["REFUSED jürgen|LOGIN|EmptyPassword", &format!("x {DENY}")];
        check("x LOGIN \"jürgen\" \"\"\r\n", &empty, "");
        check("x LOGIN \"jürgen\" {0}\r\n\r\n", &[READY, empty[0], empty[1]], "");
        check("x LOGIN \"jürgen\" pw\r\n", &[&login("jürgen", "pw", "LOGIN"), &format!("x {DENY}")], "");
        check("x LOGIN \" alice \" pw\r\n", &[&login("alice", "pw", "LOGIN"), &format!("x {DENY}")], "");

        let n = PW.len();
        let sync = format!("x LOGIN {{5}}\r\nalice {{{n}}}\r\n{PW}\r\n");
        check(&sync, &[READY, READY, &login("alice", PW, "LOGIN"), &format!("x {DENY}")], "");
        let plus = format!("x LOGIN {{5+}}\r\nalice {{{n}+}}\r\n{PW}\r\n");
        check(&plus, &[&login("alice", PW, "LOGIN"), &format!("x {DENY}")], "");
        let mixed = format!("x LOGIN \"alice\" {{{n}+}}\r\n{PW}\r\n");
        check(&mixed, &[&login("alice", PW, "LOGIN"), &format!("x {DENY}")], "");
        let invalid_user = ["REFUSED -|LOGIN|InvalidUserName", &format!("x {DENY}")];
        check("x LOGIN {0}\r\n pw\r\n", &[READY, invalid_user[0], invalid_user[1]], "");
        check("x LOGIN \" \" pw\r\n", &invalid_user, "");
    }

    #[test]
    fn literal_content_is_data() {
        check("x LOGIN alice {10}\r\nb LOGOUT\r\n\r\n", &[READY, "x BAD Invalid user name or password\r\n"], "");
        check(
            "x LOGIN alice {8}\r\nb LOGOUT\r\n",
            &[READY, &login("alice", "b LOGOUT", "LOGIN"), &format!("x {DENY}")],
            "",
        );
    }

    #[test]
    fn malformed_login_arguments() {
        let invalid = "x BAD Invalid user name or password\r\n";
        let refused = ["REFUSED -|LOGIN|InvalidUserName", &format!("x {DENY}")];
        // A well-formed argument that is no usable user name is a refused login...
        check("x LOGIN {3}\r\na\0b pw\r\n", &[READY, refused[0], refused[1]], "");
        // ...a password no upstream can carry is a malformed argument.
        check("x LOGIN alice {3}\r\na\0b\r\n", &[READY, invalid], "");
        check("x LOGIN () pw\r\n", &["x BAD LOGIN needs a user name and a password\r\n"], "");
        check("x LOGIN a\\b pw\r\n", &["x BAD Invalid character\r\n"], "");
        check("x LOGIN \"a\\nb\" pw\r\n", &["x BAD Invalid escape in quoted string\r\n"], "");
        check("x LOGIN \"a\rb\" pw\r\n", &["x BAD Invalid character in quoted string\r\n"], "");
        check("x LOGIN \"ab pw\r\n", &["x BAD Unterminated quoted string\r\n"], "");
        check(b"x LOGIN \"a\xffb\" pw\r\n", &refused, "");
        check("x LOGIN alice\r\n", &["x BAD LOGIN needs a user name and a password\r\n"], "");
        check("x LOGIN a b c\r\n", &["x BAD LOGIN needs a user name and a password\r\n"], "");
        check("x LOGIN \"a\"\"b\"\r\n", &["x BAD Missing space between arguments\r\n"], "");
        check("x LOGIN {5}x\r\n", &["x BAD Invalid literal\r\n"], "");
        // A bad command announcing a synchronizing literal is answered at once.
        check("x LOGIN a\\b {5}\r\ny NOOP\r\n", &["x BAD Invalid character\r\n", "y OK NOOP completed\r\n"], "");
        // ...but a LITERAL+ literal's bytes are skipped, even if they look like commands.
        check(
            "x LOGIN a\\b {8+}\r\ny LOGOUT\r\nz NOOP\r\n",
            &["x BAD Invalid character\r\n", "z OK NOOP completed\r\n"],
            "",
        );
        check("+ {8+}\r\ny LOGOUT\r\n", &["* BAD Invalid tag\r\n"], "");
    }

    #[test]
    fn literal_limits() {
        check("x LOGIN {101}\r\ny NOOP\r\n", &["x BAD Literal too large\r\n", "y OK NOOP completed\r\n"], "");
        check("x LOGIN {99999999999999999999999999}\r\n", &["x BAD Literal too large\r\n"], "");
        check("x LOGIN {101+}\r\nabc", &["CLOSE * BYE Literal too large\r\n"], "abc");
        // The literal budget is per command, not per literal.
        let two = [b"x LOGIN {60}\r\n".as_slice(), &[b'a'; 60], b" {41}\r\ny NOOP\r\n"].concat();
        check(&two, &[READY, "x BAD Literal too large\r\n", "y OK NOOP completed\r\n"], "");
        let (log, _) = run(
            make().as_mut(),
            &[b"x LOGIN {60+}\r\n".as_slice(), &[b'a'; 60], b" {41+}\r\n"].concat(),
            Decision::Deny,
        );
        assert_eq!(log, ["CLOSE * BYE Literal too large\r\n"]);
    }

    /// Runs `input` split every way with `room` bytes for literals.
    fn check_room(input: impl AsRef<[u8]>, room: usize, expected: &[&str], leftover: &str) {
        let (log, rest) = testing::run_all_splits_with_room(&make, input.as_ref(), Decision::Deny, room);
        assert_eq!(log, expected);
        assert_eq!(String::from_utf8_lossy(&rest), leftover);
    }

    #[test]
    fn literals_wait_for_room() {
        let limit = "x NO [LIMIT] Server busy; literal refused, try again later\r\n";
        // No room: a synchronizing literal is refused before the continuation; the client
        // never sends its bytes and the connection goes on.
        check_room("x LOGIN {5}\r\ny NOOP\r\n", 4, &["NO ROOM 5", limit, "y OK NOOP completed\r\n"], "");
        // A LITERAL+ literal's bytes are skipped, then the command is refused.
        check_room("x LOGIN {5+}\r\nalice pw\r\ny NOOP\r\n", 4, &["NO ROOM 5", limit, "y OK NOOP completed\r\n"], "");
        // A second literal of the same command may be the one without room.
        check_room(
            "x LOGIN {5}\r\nalice {8}\r\ny NOOP\r\n",
            10,
            &[READY, "NO ROOM 8", limit, "y OK NOOP completed\r\n"],
            "",
        );
        check_room(
            "x LOGIN {5+}\r\nalice {8+}\r\nb LOGOUT\r\ny NOOP\r\n",
            10,
            &["NO ROOM 8", limit, "y OK NOOP completed\r\n"],
            "",
        );
        // With room, the same inputs log in; empty literals need none.
        check_room(
            "x LOGIN {5}\r\nalice {8}\r\nb LOGOUT\r\n",
            13,
            &[READY, READY, &login("alice", "b LOGOUT", "LOGIN"), &format!("x {DENY}")],
            "",
        );
        check_room(
            "x LOGIN alice {0}\r\n\r\n",
            0,
            &[READY, "REFUSED alice|LOGIN|EmptyPassword", &format!("x {DENY}")],
            "",
        );
        // A command that already failed skips its literals without asking for room.
        check_room("x LOGIN a\\b {8+}\r\ny LOGOUT\r\n", 0, &["x BAD Invalid character\r\n"], "");
    }

    #[test]
    fn held_counts_granted_literals_until_the_command_ends() {
        let mut d = ImapDialogue::new(&settings());
        let mut buf = BytesMut::from(&b"x LOGIN {5}\r\n"[..]);
        assert!(matches!(d.step(&mut buf), Step::Literal(5)));
        assert!(matches!(d.step(&mut buf), Step::Literal(5)), "asks again until answered");
        assert_eq!(d.held(), 0);
        d.literal_room(true);
        assert_eq!(d.held(), 5);
        assert!(matches!(d.step(&mut buf), Step::Reply(r) if r == READY.as_bytes()));
        buf.extend_from_slice(b"alice pw\r\n");
        assert!(matches!(d.step(&mut buf), Step::Login(_)));
        assert_eq!(d.held(), 0);
        d.literal_room(true);
        assert!(matches!(d.step(&mut buf), Step::NeedMore), "an unasked answer changes nothing");
    }

    /// The literal's buffer as it stands, while the command is being assembled.
    fn literal_capacity(d: &ImapDialogue) -> usize {
        match &d.state {
            State::Assembling(cmd) => cmd.literal.as_ref().map_or(0, |l| l.data.capacity()),
            _ => 0,
        }
    }

    #[test]
    fn a_granted_literal_takes_memory_as_its_bytes_arrive() {
        let mut d = ImapDialogue::new(&DialogueSettings { max_literal: 8000, ..settings() });
        let mut buf = BytesMut::from(&b"x LOGIN {8000}\r\n"[..]);
        assert!(matches!(d.step(&mut buf), Step::Literal(8000)));
        d.literal_room(true);
        assert_eq!(d.held(), 8000, "the room is granted for the whole literal");
        assert!(matches!(d.step(&mut buf), Step::Reply(_)));
        assert_eq!(literal_capacity(&d), 0, "nothing allocated before a byte arrives");
        buf.extend_from_slice(&[b'p'; 10]);
        assert!(matches!(d.step(&mut buf), Step::NeedMore));
        assert_eq!(literal_capacity(&d), LITERAL_FIRST_CHUNK);
        buf.extend_from_slice(&[b'p'; 3990]);
        assert!(matches!(d.step(&mut buf), Step::NeedMore));
        assert_eq!(literal_capacity(&d), 4000, "grown to what came");
        buf.extend_from_slice(&[b'p'; 3000]);
        assert!(matches!(d.step(&mut buf), Step::NeedMore));
        assert_eq!(literal_capacity(&d), 8000, "never beyond the announced size");
        buf.extend_from_slice(&[b'p'; 1000]);
        buf.extend_from_slice(b" pw\r\n");
        match d.step(&mut buf) {
            Step::Login(c) => assert_eq!(c.user.as_bytes(), &[b'p'; 8000][..]),
            _ => panic!("the login with the whole literal"),
        }
    }

    #[test]
    fn long_lines_close() {
        let long = format!("x LOGIN {}", "a".repeat(300));
        check(&long, &["CLOSE * BYE Line too long\r\n"], &long);
        // Continuation lines share the command's line budget.
        let cont = format!("x LOGIN {{1+}}\r\na {}\r\n", "b".repeat(190));
        let (log, _) = run(make().as_mut(), cont.as_bytes(), Decision::Deny);
        assert_eq!(log, ["CLOSE * BYE Line too long\r\n"]);
        let sasl = format!("x AUTHENTICATE PLAIN\r\n{}\r\n", "A".repeat(300));
        let (log, _) = run(make().as_mut(), sasl.as_bytes(), Decision::Deny);
        assert_eq!(log, ["+ \r\n", "CLOSE * BYE Line too long\r\n"]);
    }

    #[test]
    fn authenticate_plain_and_login() {
        let plain = b64(&format!("\0alice\0{PW}"));
        let deny = format!("x {DENY}");
        let plain_login = login("alice", PW, "AUTHENTICATE PLAIN");
        let login_login = login("alice", PW, "AUTHENTICATE LOGIN");
        check(format!("x AUTHENTICATE PLAIN {plain}\r\n"), &[&plain_login, &deny], "");
        check(format!("x authenticate plain\r\n{plain}\r\n"), &["+ \r\n", &plain_login, &deny], "");
        check(
            format!("x AUTHENTICATE LOGIN\r\n{}\r\n{}\r\n", b64("alice"), b64(PW)),
            &["+ VXNlcm5hbWU6\r\n", "+ UGFzc3dvcmQ6\r\n", &login_login, &deny],
            "",
        );
        check(
            format!("x AUTHENTICATE LOGIN {}\r\n{}\r\n", b64("alice"), b64(PW)),
            &["+ UGFzc3dvcmQ6\r\n", &login_login, &deny],
            "",
        );
        check("x AUTHENTICATE PLAIN\r\n*\r\n", &["+ \r\n", "x BAD Authentication cancelled\r\n"], "");
        check("x AUTHENTICATE LOGIN\r\n*\r\n", &["+ VXNlcm5hbWU6\r\n", "x BAD Authentication cancelled\r\n"], "");
        check("x AUTHENTICATE PLAIN =\r\n", &["x BAD Invalid SASL response\r\n"], "");
        check("x AUTHENTICATE PLAIN\r\n!!!!\r\n", &["+ \r\n", "x BAD Invalid SASL response\r\n"], "");
        let nul = b64("\0al\0ice\0pw");
        check(format!("x AUTHENTICATE PLAIN {nul}\r\n"), &["x BAD Invalid SASL response\r\n"], "");
        let foreign = b64("bob\0alice\0pw");
        let authzid = "REFUSED alice|AUTHENTICATE PLAIN|AuthzidMismatch";
        check(format!("x AUTHENTICATE PLAIN {foreign}\r\n"), &[authzid, &deny], "");
        check(format!("x AUTHENTICATE PLAIN\r\n{foreign}\r\n"), &["+ \r\n", authzid, &deny], "");
        let empty = b64("\0alice\0");
        check(
            format!("x AUTHENTICATE PLAIN {empty}\r\n"),
            &["REFUSED alice|AUTHENTICATE PLAIN|EmptyPassword", &deny],
            "",
        );
        check(
            format!("x AUTHENTICATE LOGIN {}\r\n{}\r\n", b64(" "), b64("pw")),
            &["+ UGFzc3dvcmQ6\r\n", "REFUSED -|AUTHENTICATE LOGIN|InvalidUserName", &deny],
            "",
        );
        // After a refusal the connection goes on, in step.
        check(
            format!("x AUTHENTICATE PLAIN {foreign}\r\ny NOOP\r\n"),
            &[authzid, &deny, "y OK NOOP completed\r\n"],
            "",
        );
        let same = b64("alice\0alice\0pw");
        check(format!("x AUTHENTICATE PLAIN {same}\r\n"), &[&login("alice", "pw", "AUTHENTICATE PLAIN"), &deny], "");
        check("x AUTHENTICATE CRAM-MD5\r\n", &["x NO [CANNOT] Unsupported authentication mechanism\r\n"], "");
        check("x AUTHENTICATE\r\n", &["x BAD Invalid AUTHENTICATE arguments\r\n"], "");
    }

    #[test]
    fn decisions_carry_the_tag_and_keep_pipelined_bytes() {
        let input = b"t7 LOGIN alice pw\r\nt8 SELECT INBOX\r\n";
        let (log, rest) = run(make().as_mut(), input, Decision::Accept(Some("IMAP4rev1 IDLE")));
        assert_eq!(log, [login("alice", "pw", "LOGIN"), "t7 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n".into()]);
        assert_eq!(rest, b"t8 SELECT INBOX\r\n");
        let (log, _) = run(make().as_mut(), input, Decision::Accept(None));
        assert_eq!(log[1], "t7 OK Logged in\r\n");
        let (log, _) = run(make().as_mut(), input, Decision::Accept(Some("IMAP4rev1]\r\n* BYE")));
        assert_eq!(log[1], "t7 OK Logged in\r\n");
        let (log, rest) = run(make().as_mut(), input, Decision::Unavailable);
        assert_eq!(log[1], "t7 NO [UNAVAILABLE] Mail service temporarily unavailable, try again later\r\n");
        assert_eq!(log[2], "t8 BAD Log in first\r\n");
        assert!(rest.is_empty());
        // Retry after a denial.
        let (log, _) = run(make().as_mut(), b"a LOGIN x y\r\nb LOGIN x z\r\n", Decision::Deny);
        assert_eq!(log[1], format!("a {DENY}"));
        assert_eq!(log[3], format!("b {DENY}"));
    }

    #[test]
    fn too_many_bad_commands_close() {
        let input = "x SELECT INBOX\r\n".repeat(MAX_BAD_COMMANDS as usize + 1);
        let (log, rest) = run(make().as_mut(), input.as_bytes(), Decision::Deny);
        assert_eq!(log.len(), MAX_BAD_COMMANDS as usize);
        assert_eq!(log.last().unwrap(), "CLOSE x BAD Log in first\r\n* BYE Too many invalid commands\r\n");
        assert_eq!(rest, b"x SELECT INBOX\r\n");
    }

    #[test]
    fn session_goodbyes() {
        let d = make();
        assert_eq!(d.timed_out(), b"* BYE Autologout; login took too long\r\n");
        assert_eq!(d.shutting_down(), b"* BYE Server shutting down\r\n");
    }

    #[test]
    fn astring_encoding() {
        let inline = |v: &str| match encode_astring(v) {
            Astring::Inline(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
            Astring::Literal(_) => panic!("{v:?} became a literal"),
        };
        assert_eq!(inline("alice@example.com"), "alice@example.com");
        assert_eq!(inline(""), "\"\"");
        assert_eq!(inline("pa ss\"w\\rd"), "\"pa ss\\\"w\\\\rd\"");
        assert_eq!(inline("a*b%c(d)"), "\"a*b%c(d)\"");
        for literal in ["pä", "a\r\nb"] {
            assert!(matches!(encode_astring(literal), Astring::Literal(b) if b == literal.as_bytes()));
        }
        assert_eq!(literal_header(12, false), "{12}\r\n");
        assert_eq!(literal_header(3, true), "{3+}\r\n");
        // Whatever Postern writes upstream, its own parser reads back unchanged.
        for pw in ["pa ss\"w\\rd", "plain", "a{5}", "x)y(", PW] {
            let mut input = b"x LOGIN alice ".to_vec();
            match encode_astring(pw) {
                Astring::Inline(bytes) => input.extend_from_slice(&bytes),
                Astring::Literal(bytes) => {
                    input.extend_from_slice(literal_header(bytes.len(), true).as_bytes());
                    input.extend_from_slice(bytes);
                }
            }
            input.extend_from_slice(b"\r\n");
            let (log, _) = run(make().as_mut(), &input, Decision::Deny);
            assert_eq!(log[0], login("alice", pw, "LOGIN"));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let plain = b64("\0a\0b");
        let words: &[&[u8]] = &[
            b"a ",
            b"LOGIN ",
            b"AUTHENTICATE ",
            b"PLAIN",
            b"LOGIN",
            b"ID ",
            b"(",
            b")",
            b"NIL",
            b"{",
            b"}",
            b"+",
            b"{3}\r\n",
            b"{2+}\r\n",
            b"{99999999999999999999}",
            b"\"",
            b"\\",
            b"\r\n",
            b"\n",
            b" ",
            b"*",
            b"=",
            b"\0",
            b"\r",
            b"\xff",
            b"x",
            plain.as_bytes(),
        ];
        fuzz(&make, words, 3);
        let tiny = || -> Box<dyn Dialogue> {
            Box::new(ImapDialogue::new(&DialogueSettings {
                max_line: 12,
                max_literal: 3,
                ..DialogueSettings::default()
            }))
        };
        fuzz(&tiny, words, 4);
    }

    fn make_pre_tls() -> Box<dyn Dialogue> {
        Box::new(ImapDialogue::pre_tls(&settings()))
    }

    fn check_pre_tls(input: impl AsRef<[u8]>, expected: &[&str], leftover: &str) {
        testing::check(&make_pre_tls, input, expected, leftover);
    }

    const PRIVACY: &str = "NO [PRIVACYREQUIRED] Use STARTTLS first; no login before TLS\r\n";

    #[test]
    fn before_tls_only_the_upgrade_is_offered() {
        assert_eq!(make_pre_tls().greeting(), b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Postern ready.\r\n");
        let caps = "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\na OK CAPABILITY completed\r\n";
        check_pre_tls("a CAPABILITY\r\n", &[caps], "");
        check_pre_tls("x noop\n", &["x OK NOOP completed\r\n"], "");
        check_pre_tls(
            "x LOGOUT\r\ny NOOP\r\n",
            &["CLOSE * BYE Logging out\r\nx OK LOGOUT completed\r\n"],
            "y NOOP\r\n",
        );
        check_pre_tls("x ID NIL\r\n", &["x BAD Use STARTTLS first\r\n"], "");
        check_pre_tls("x SELECT INBOX\r\n", &["x BAD Use STARTTLS first\r\n"], "");
        check_pre_tls("x STARTTLS now\r\n", &["x BAD Invalid arguments\r\n"], "");
        check_pre_tls("x CAPABILITY x\r\n", &["x BAD Invalid arguments\r\n"], "");
        check_pre_tls("a CAPABILITY\r\nb starttls\r\n", &[caps, "STARTTLS b OK Begin TLS negotiation now\r\n"], "");
    }

    #[test]
    fn logins_before_tls_are_refused_unread() {
        let refused = |mechanism: &str| format!("REFUSED -|{mechanism}|TlsRequired");
        check_pre_tls("a LOGIN alice@example.com secret\r\n", &[&refused("LOGIN"), &format!("a {PRIVACY}")], "");
        let plain = b64("\0alice@example.com\0secret");
        check_pre_tls(
            format!("b AUTHENTICATE PLAIN {plain}\r\nc AUTHENTICATE PLAIN\r\nd login\r\n"),
            &[
                &refused("AUTHENTICATE"),
                &format!("b {PRIVACY}"),
                &refused("AUTHENTICATE"),
                &format!("c {PRIVACY}"),
                &refused("LOGIN"),
                &format!("d {PRIVACY}"),
            ],
            "",
        );
        // A literal is where a password would go: a synchronizing one gets no continuation,
        // a LITERAL+ one is skipped unread.
        check_pre_tls(
            "a LOGIN alice {6}\r\nb NOOP\r\n",
            &["a BAD Literals are not accepted before STARTTLS\r\n", "b OK NOOP completed\r\n"],
            "",
        );
        check_pre_tls(
            "a LOGIN alice {6+}\r\nsecret\r\nb NOOP\r\n",
            &["a BAD Literals are not accepted before STARTTLS\r\n", "b OK NOOP completed\r\n"],
            "",
        );
        check_pre_tls("a LOGIN alice {999}\r\n", &["a BAD Literal too large\r\n"], "");
    }

    #[test]
    fn commands_pipelined_after_starttls_are_left_unexecuted() {
        // The CVE-2011-0411 class: the step consumes the STARTTLS line only, and what follows
        // is left for the session to discard, never answered.
        check_pre_tls(
            "a STARTTLS\r\nb LOGIN alice@example.com pw\r\nc CAPABILITY\r\n",
            &["STARTTLS a OK Begin TLS negotiation now\r\n"],
            "b LOGIN alice@example.com pw\r\nc CAPABILITY\r\n",
        );
        check_pre_tls("a STARTTLS\nb", &["STARTTLS a OK Begin TLS negotiation now\r\n"], "b");
        // Once it said go ahead, the dialogue reads nothing more.
        let mut d = make_pre_tls();
        let (log, rest) = run(d.as_mut(), b"a STARTTLS\r\n", Decision::Deny);
        assert_eq!(log, ["STARTTLS a OK Begin TLS negotiation now\r\n"]);
        assert!(rest.is_empty());
        let mut more = BytesMut::from(&b"b NOOP\r\n"[..]);
        assert!(matches!(d.step(&mut more), Step::NeedMore));
        assert_eq!(&more[..], b"b NOOP\r\n");
    }

    #[test]
    fn pre_tls_garbage_never_panics() {
        let words: &[&[u8]] = &[
            b"a ",
            b"STARTTLS",
            b"LOGIN ",
            b"AUTHENTICATE ",
            b"PLAIN",
            b"CAPABILITY",
            b"NOOP",
            b"LOGOUT",
            b"{3}\r\n",
            b"{2+}\r\n",
            b"\"",
            b"\r\n",
            b"\n",
            b" ",
            b"\0",
            b"x",
        ];
        fuzz(&make_pre_tls, words, 5);
    }
}
