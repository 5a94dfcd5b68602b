//! Chama: trace-driven noise simulator over the LogGOPS model.
#![forbid(unsafe_code)]
