//! Puma portals: the pure, static-size message-delivery engine shared by every QK.
#![no_std]
#![forbid(unsafe_code)]
