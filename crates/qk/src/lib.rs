//! The hosted quintessential kernel: message fabric and enforcement on Linux.
