//! Imap pre-login dialogue (placeholder until the parser lands).

use bytes::BytesMut;

use super::{Dialogue, DialogueSettings, Step, UpstreamInfo};

/// Imap pre-login state machine.
pub struct ImapDialogue {
    _settings: DialogueSettings,
}

impl ImapDialogue {
    /// A dialogue for a new connection.
    pub fn new(settings: &DialogueSettings) -> Self {
        Self { _settings: settings.clone() }
    }
}

impl Dialogue for ImapDialogue {
    fn greeting(&mut self) -> Vec<u8> {
        Vec::new()
    }
    fn step(&mut self, _input: &mut BytesMut) -> Step {
        Step::Close(Vec::new())
    }
    fn denied(&mut self) -> Vec<u8> {
        Vec::new()
    }
    fn unavailable(&mut self) -> Vec<u8> {
        Vec::new()
    }
    fn accepted(&mut self, _upstream: &UpstreamInfo) -> Vec<u8> {
        Vec::new()
    }
    fn timed_out(&self) -> Vec<u8> {
        Vec::new()
    }
    fn shutting_down(&self) -> Vec<u8> {
        Vec::new()
    }
}
