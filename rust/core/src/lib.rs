//! gmtier-core: the tiered expert store (disk -> pinned RAM -> GPU slot accounting) and the
//! fused CPU AdamW. Pure Rust, testable with `cargo test`; Python bindings live in `rust/python`.

pub mod adam;
pub mod error;
pub mod store;
