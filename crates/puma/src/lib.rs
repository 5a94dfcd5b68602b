//! The puma application library (placeholder until its issue lands).
#![forbid(unsafe_code)]
