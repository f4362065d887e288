//! gmtier-core: the tiered expert store (disk -> pinned RAM -> GPU slot accounting), the fused
//! CPU AdamW, and the scratch file that activations spill to. Pure Rust, testable with
//! `cargo test`; Python bindings live in `rust/python`.

pub mod adam;
pub mod error;
pub mod spill;
pub mod store;
