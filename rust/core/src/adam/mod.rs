//! Fused multi-threaded SIMD AdamW (filled in by the Adam work).
