//! Text handling shared by the pre-login dialogues: line framing under a length limit,
//! the checks every user name and password must pass, the bad-command budget, and the
//! state machine POP3 and SMTP share.

use std::ops::Deref;

use bytes::BytesMut;
use zeroize::Zeroize;

use super::Step;
use super::sasl::SaslExchange;
use crate::protocol::limits::MAX_BAD_COMMANDS;

/// One line taken from the client's input, without its terminator.
///
/// Pre-login lines may carry passwords, so the bytes are wiped when the line is dropped.
pub struct Line {
    raw: BytesMut,
    len: usize,
}

impl Deref for Line {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.raw[..self.len]
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.raw[..].zeroize();
    }
}

/// What [`take_line`] found at the front of the input.
pub enum Framed {
    /// A complete line, removed from the input.
    Line(Line),
    /// No line terminator yet, and the limit is not reached: read more.
    Incomplete,
    /// The limit is reached without a line terminator: the client must be cut off.
    TooLong,
}

/// Removes one line from the front of `input` if a whole one is there.
///
/// A line ends at LF, with or without a preceding CR. `max` counts the terminator, and
/// only the first `max` bytes are ever scanned, so a hostile client cannot make the
/// dialogue search an unbounded buffer.
pub fn take_line(input: &mut BytesMut, max: usize) -> Framed {
    let window = input.len().min(max);
    match input[..window].iter().position(|&b| b == b'\n') {
        Some(lf) => {
            let raw = input.split_to(lf + 1);
            let len = if lf > 0 && raw[lf - 1] == b'\r' { lf - 1 } else { lf };
            Framed::Line(Line { raw, len })
        }
        None if input.len() >= max => Framed::TooLong,
        None => Framed::Incomplete,
    }
}

/// Splits a command line into its verb and whatever follows the first space.
pub fn split_verb(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(space) => (&line[..space], &line[space + 1..]),
        None => (line, &[]),
    }
}

/// The space-separated words of `text`, ignoring repeated spaces.
pub fn words(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

/// Where a line-based dialogue (POP3, SMTP) stands; IMAP, with tags and literals, has its own.
pub enum LineState {
    /// Waiting for a command.
    Command,
    /// In a SASL exchange: the next line answers its challenge.
    Sasl(SaslExchange),
    /// A login is with the session, which will call `denied`, `unavailable` or `accepted`.
    Deciding,
    /// Logged in or closing: nothing more is read.
    Finished,
}

/// What a line-based dialogue does with the next input.
pub enum NextLine {
    /// Nothing to handle now: return this step.
    Step(Step),
    /// A command line.
    Command(Line),
    /// A line answering the SASL exchange's challenge.
    Sasl(Line, SaslExchange),
}

impl LineState {
    /// Frames the next line; an over-long one finishes the dialogue with `too_long`.
    pub fn next(&mut self, input: &mut BytesMut, max_line: usize, too_long: &[u8]) -> NextLine {
        if matches!(self, LineState::Deciding | LineState::Finished) {
            return NextLine::Step(Step::NeedMore);
        }
        let line = match take_line(input, max_line) {
            Framed::Line(line) => line,
            Framed::Incomplete => return NextLine::Step(Step::NeedMore),
            Framed::TooLong => {
                *self = LineState::Finished;
                return NextLine::Step(Step::Close(too_long.to_vec()));
            }
        };
        match std::mem::replace(self, LineState::Command) {
            LineState::Sasl(exchange) => NextLine::Sasl(line, exchange),
            _ => NextLine::Command(line),
        }
    }

    /// Back to commands after the session refused the pending login.
    pub fn refused(&mut self) {
        if matches!(self, LineState::Deciding) {
            *self = LineState::Command;
        }
    }
}

/// Counts failed or invalid commands before login.
#[derive(Debug, Default)]
pub struct BadCommands(u32);

impl BadCommands {
    /// Records one more bad command; true once [`MAX_BAD_COMMANDS`] is reached and the
    /// connection must be closed.
    pub fn record(&mut self) -> bool {
        self.0 = self.0.saturating_add(1);
        self.0 >= MAX_BAD_COMMANDS
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Drives a dialogue over scripted input and records what it did, so the parsers'
    //! tests can compare whole transcripts, fed at once or split at every byte.

    use bytes::BytesMut;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use crate::protocol::{Dialogue, Step, UpstreamInfo};

    /// How the fake session answers every login.
    #[derive(Clone, Copy, Debug)]
    pub enum Decision {
        Deny,
        Unavailable,
        Accept(Option<&'static str>),
    }

    /// Renders a login for comparison: user, prefix, password, mechanism, hello.
    fn login_text(c: &crate::protocol::Credentials) -> String {
        format!(
            "LOGIN {}|{}|{}|{}|{}",
            c.user,
            c.upstream_prefix,
            c.password.expose(),
            c.mechanism,
            c.client_hello.as_deref().unwrap_or("-")
        )
    }

    /// Steps until the dialogue needs more input or is finished, appending to `log`.
    /// Returns false once the dialogue closed or accepted a login.
    /// Literals are granted while `room` bytes last; each refused one is logged.
    pub fn pump_with_room(
        d: &mut dyn Dialogue,
        buf: &mut BytesMut,
        decision: Decision,
        log: &mut Vec<String>,
        room: &mut usize,
    ) -> bool {
        for _ in 0..100_000 {
            match d.step(buf) {
                Step::Literal(size) => {
                    let granted = size <= *room;
                    if granted {
                        *room -= size;
                    } else {
                        log.push(format!("NO ROOM {size}"));
                    }
                    d.literal_room(granted);
                    continue;
                }
                Step::NeedMore => return true,
                Step::Reply(r) => log.push(String::from_utf8_lossy(&r).into_owned()),
                Step::Close(r) => {
                    log.push(format!("CLOSE {}", String::from_utf8_lossy(&r)));
                    return false;
                }
                Step::StartTls(r) => {
                    // The session takes over: what is left in `buf` is what it discards.
                    log.push(format!("STARTTLS {}", String::from_utf8_lossy(&r)));
                    return false;
                }
                Step::Login(c) => {
                    for field in [&c.user, &c.upstream_prefix, &c.password.expose().to_owned()] {
                        assert!(!field.contains(['\0', '\r', '\n']), "bad credentials {c:?}");
                    }
                    assert!(!c.user.is_empty() && !c.password.is_empty());
                    log.push(login_text(&c));
                    let reply = match decision {
                        Decision::Deny => d.denied(),
                        Decision::Unavailable => d.unavailable(),
                        Decision::Accept(caps) => {
                            let info = UpstreamInfo { capabilities: caps.map(str::to_owned) };
                            let r = d.accepted(&info);
                            log.push(String::from_utf8_lossy(&r).into_owned());
                            return false;
                        }
                    };
                    log.push(String::from_utf8_lossy(&reply).into_owned());
                }
                Step::Refused(r) => {
                    let user = r.user.as_deref().unwrap_or("-");
                    assert!(!user.is_empty() && !user.contains(char::is_control), "bad refused user {r:?}");
                    log.push(format!("REFUSED {user}|{}|{:?}", r.mechanism, r.fault));
                    log.push(String::from_utf8_lossy(&d.denied()).into_owned());
                }
            }
        }
        panic!("dialogue made no progress");
    }

    /// Feeds `input` at once; returns the transcript and what is left in the buffer.
    pub fn run(d: &mut dyn Dialogue, input: &[u8], decision: Decision) -> (Vec<String>, Vec<u8>) {
        run_with_room(d, input, decision, usize::MAX)
    }

    /// Like [`run`], with `room` bytes for literals.
    fn run_with_room(d: &mut dyn Dialogue, input: &[u8], decision: Decision, room: usize) -> (Vec<String>, Vec<u8>) {
        let mut buf = BytesMut::from(input);
        let mut log = Vec::new();
        pump_with_room(d, &mut buf, decision, &mut log, &mut { room });
        (log, buf.to_vec())
    }

    /// Feeds `input` at once, then split at every byte boundary, and checks every split
    /// gives the same transcript and leftover. Returns them.
    pub fn run_all_splits(
        make: &dyn Fn() -> Box<dyn Dialogue>,
        input: &[u8],
        decision: Decision,
    ) -> (Vec<String>, Vec<u8>) {
        run_all_splits_with_room(make, input, decision, usize::MAX)
    }

    /// Like [`run_all_splits`], with `room` bytes for literals.
    pub fn run_all_splits_with_room(
        make: &dyn Fn() -> Box<dyn Dialogue>,
        input: &[u8],
        decision: Decision,
        room: usize,
    ) -> (Vec<String>, Vec<u8>) {
        let whole = run_with_room(make().as_mut(), input, decision, room);
        for cut in 0..input.len() {
            let mut d = make();
            let mut buf = BytesMut::from(&input[..cut]);
            let mut log = Vec::new();
            let mut left = room;
            if pump_with_room(d.as_mut(), &mut buf, decision, &mut log, &mut left) {
                buf.extend_from_slice(&input[cut..]);
                pump_with_room(d.as_mut(), &mut buf, decision, &mut log, &mut left);
            } else {
                buf.extend_from_slice(&input[cut..]);
            }
            assert_eq!((&log, &buf.to_vec()), (&whole.0, &whole.1), "split at {cut}");
        }
        whole
    }

    /// Feeds random byte soup built from `words` in random chunks; only checks that the
    /// dialogue neither panics nor loops, and never yields bad credentials.
    /// Runs `input` split every way with logins denied, and checks the transcript and what
    /// is left unread.
    pub fn check(make: &dyn Fn() -> Box<dyn Dialogue>, input: impl AsRef<[u8]>, expected: &[&str], leftover: &str) {
        let input = input.as_ref();
        let (log, rest) = run_all_splits(make, input, Decision::Deny);
        assert_eq!(log, expected, "input {:?}", String::from_utf8_lossy(input));
        assert_eq!(String::from_utf8_lossy(&rest), leftover, "input {:?}", String::from_utf8_lossy(input));
    }

    /// Standard base64 of `raw`, as SASL clients send it.
    pub fn b64(raw: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    pub fn fuzz(make: &dyn Fn() -> Box<dyn Dialogue>, words: &[&[u8]], seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..300 {
            let mut input = Vec::new();
            for _ in 0..rng.gen_range(1..60) {
                if rng.gen_bool(0.15) {
                    input.push(rng.r#gen::<u8>());
                } else {
                    input.extend_from_slice(words[rng.gen_range(0..words.len())]);
                }
            }
            let decision = match rng.gen_range(0..3) {
                0 => Decision::Deny,
                1 => Decision::Unavailable,
                _ => Decision::Accept(Some("IMAP4rev1")),
            };
            let mut d = make();
            d.greeting();
            let mut buf = BytesMut::new();
            let mut log = Vec::new();
            let mut rest = &input[..];
            let mut room = if rng.gen_bool(0.5) { usize::MAX } else { rng.gen_range(0..16) };
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(16));
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if !pump_with_room(d.as_mut(), &mut buf, decision, &mut log, &mut room) {
                    break;
                }
            }
            let _ = (d.timed_out(), d.shutting_down(), d.denied(), d.unavailable());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(input: &mut BytesMut, max: usize) -> Option<Vec<u8>> {
        match take_line(input, max) {
            Framed::Line(l) => Some(l.to_vec()),
            Framed::Incomplete => None,
            Framed::TooLong => Some(b"<too long>".to_vec()),
        }
    }

    #[test]
    fn frames_crlf_and_bare_lf() {
        let mut b = BytesMut::from(&b"one\r\ntwo\nthree"[..]);
        assert_eq!(line_of(&mut b, 100).unwrap(), b"one");
        assert_eq!(line_of(&mut b, 100).unwrap(), b"two");
        assert_eq!(line_of(&mut b, 100), None);
        assert_eq!(&b[..], b"three");
    }

    #[test]
    fn limit_counts_the_terminator() {
        let mut b = BytesMut::from(&b"abc\r\n"[..]);
        assert_eq!(line_of(&mut b, 5).unwrap(), b"abc");
        let mut b = BytesMut::from(&b"abcd\r\n"[..]);
        assert_eq!(line_of(&mut b, 5).unwrap(), b"<too long>");
        let mut b = BytesMut::from(&b"abcd"[..]);
        assert_eq!(line_of(&mut b, 5), None);
        let mut b = BytesMut::from(&b"abcde"[..]);
        assert_eq!(line_of(&mut b, 5).unwrap(), b"<too long>");
    }

    #[test]
    fn bad_command_budget() {
        let mut bad = BadCommands::default();
        for _ in 1..MAX_BAD_COMMANDS {
            assert!(!bad.record());
        }
        assert!(bad.record());
    }
}
