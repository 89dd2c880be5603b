//! The audit trail: one record per session or refused login ([`record`]), written to the
//! log and to the append-only audit file ([`file`]) that `postern audit` reads.

pub mod file;
pub mod record;

pub use record::{Event, Outcome, SessionRecord};
