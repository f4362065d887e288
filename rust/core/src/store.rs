//! Tiered expert store (filled in by the store work).
