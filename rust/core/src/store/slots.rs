//! The state of one RAM slot of the store, and of a load waiting for a slot.

use super::{Key, Sections};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    Empty,
    Loading,
    Ready,
    /// A write-back is running; the RAM data stays valid.
    Flushing,
}

#[derive(Debug)]
pub(super) struct SlotInfo {
    pub(super) state: SlotState,
    pub(super) dirty: bool,
    pub(super) dirty_gen: u64,
    /// Key whose load waits for this slot's write-back (eviction of a dirty record).
    pub(super) evict_for: Option<Key>,
    /// Tickets waiting for a read into this slot, with the sections each needs (to hear about
    /// a failure); a ticket leaves the list once its sections are valid.
    pub(super) tickets: Vec<(u64, Sections)>,
    /// Sections of the record in RAM that are valid (read and verified, or written by the
    /// caller of a whole record); only these may be used.
    pub(super) valid: Sections,
    /// Sections someone asked for: a finished read starts the next read while any is missing.
    pub(super) want: Sections,
    /// Class and priority of that next read.
    pub(super) want_demand: bool,
    pub(super) want_priority: i64,
}

impl SlotInfo {
    pub(super) fn empty() -> SlotInfo {
        SlotInfo {
            state: SlotState::Empty,
            dirty: false,
            dirty_gen: 0,
            evict_for: None,
            tickets: vec![],
            valid: Sections::NONE,
            want: Sections::NONE,
            want_demand: false,
            want_priority: 0,
        }
    }
}

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) pins: u32,
    pub(super) demand: bool,
    pub(super) priority: i64,
    /// Sections to read (the union of what the requests and prefetches asked for).
    pub(super) sections: Sections,
    pub(super) tickets: Vec<(u64, Sections)>,
    /// Slot whose write-back must finish before this load starts.
    pub(super) flushing_into: Option<usize>,
}
