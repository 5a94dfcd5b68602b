//! The wire header: fixed size, versioned, `#[repr(C)]`, explicit
//! little-endian encoding, validated field by field before use.
//!
//! Layout (all integers little-endian, 80 bytes, no padding):
//!
//! | offset | size | field           | meaning                                                  |
//! |-------:|-----:|-----------------|----------------------------------------------------------|
//! | 0      | 1    | `version`       | [`WIRE_VERSION`]                                         |
//! | 1      | 1    | `op`            | [`Op`] code                                              |
//! | 2      | 2    | `flags`         | [`flags::ACK_REQ`], [`flags::TRUNCATED`]                 |
//! | 4      | 4    | `portal`        | portal table index at the target (checked for put/get)   |
//! | 8      | 8    | `src`           | sender group id, rank                                    |
//! | 16     | 8    | `dst`           | receiver group id, rank                                  |
//! | 24     | 8    | `match_bits`    | 64 match bits                                            |
//! | 32     | 8    | `offset`        | put/get: remote offset; reply/ack: initiator's offset    |
//! | 40     | 8    | `length`        | put/reply: payload bytes that follow; get: bytes wanted; ack: bytes deposited |
//! | 48     | 8    | `rlength`       | length the initiator asked for                           |
//! | 56     | 8    | `return_md`     | initiator's MD cookie for the reply/ack, or [`NO_MD`]    |
//! | 64     | 8    | `return_offset` | where in that MD the reply lands                         |
//! | 72     | 8    | `hdr_data`      | 64 bits of user data carried to the target's event       |

use crate::types::{ProcessId, ANY};

/// Version of the header layout this crate speaks.
pub const WIRE_VERSION: u8 = 1;
/// Size of an encoded header in bytes.
pub const HEADER_LEN: usize = 80;
/// `return_md` value meaning "no memory descriptor".
pub const NO_MD: u64 = u64::MAX;

/// Header flag bits.
pub mod flags {
    /// Put: the initiator wants an acknowledgment.
    pub const ACK_REQ: u16 = 1 << 0;
    /// Ack/reply: the target truncated the operation.
    pub const TRUNCATED: u16 = 1 << 1;
    /// Every bit this version defines.
    pub const KNOWN: u16 = ACK_REQ | TRUNCATED;
}

/// Operation carried by a header.
///
/// Codes 5..=31 are reserved for Portals 4 operations (atomic, fetch-atomic,
/// swap, triggered variants); a decoder of this version rejects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Write `length` payload bytes into the target's memory.
    Put = 1,
    /// Read `length` bytes from the target's memory; the target replies.
    Get = 2,
    /// The data answering a get, travelling back to the initiator.
    Reply = 3,
    /// Acknowledgment of a put, travelling back to the initiator.
    Ack = 4,
}

impl Op {
    /// Decode an op code.
    pub const fn from_u8(v: u8) -> Option<Op> {
        match v {
            1 => Some(Op::Put),
            2 => Some(Op::Get),
            3 => Some(Op::Reply),
            4 => Some(Op::Ack),
            _ => None,
        }
    }
}

/// Why a header was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("header is {0} bytes, need {HEADER_LEN}")]
    Short(usize),
    /// Unknown version.
    #[error("header version {found} is not supported (this engine speaks version {WIRE_VERSION})")]
    Version {
        /// Version byte received.
        found: u8,
    },
    /// Unknown op code.
    #[error("unknown operation code {0}")]
    Op(u8),
    /// Flag bits this version does not define, or flags that make no sense for the op.
    #[error("invalid flags {flags:#06x} for {op:?}")]
    Flags {
        /// Flags received.
        flags: u16,
        /// Operation.
        op: Op,
    },
    /// Portal index beyond the table.
    #[error("portal index {portal} is outside the portal table (size {limit})")]
    Portal {
        /// Index received.
        portal: u32,
        /// Table size.
        limit: u32,
    },
    /// Source or destination is a wildcard.
    #[error("source and destination must be concrete processes, not wildcards")]
    Wildcard,
    /// A length exceeds the configured maximum message size.
    #[error("length {length} exceeds the maximum message size {max}")]
    Length {
        /// Offending length.
        length: u64,
        /// Configured maximum.
        max: u64,
    },
    /// `length` and `rlength` disagree for the op.
    #[error("length {length} and requested length {rlength} are inconsistent for {op:?}")]
    Lengths {
        /// Operation.
        op: Op,
        /// `length` field.
        length: u64,
        /// `rlength` field.
        rlength: u64,
    },
    /// `offset + length` or `return_offset + rlength` overflows 64 bits.
    #[error("offset plus length overflows 64 bits")]
    Offset,
    /// The op needs a return memory descriptor and has none.
    #[error("{0:?} needs a return memory descriptor")]
    ReturnMd(Op),
}

/// Limits a header is validated against (from the receiving engine's
/// configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Number of portal table entries.
    pub portals: u32,
    /// Largest `length`/`rlength` accepted.
    pub max_message: u64,
}

/// A message header. Every value of this type that came out of
/// [`WireHeader::decode`] has passed [`WireHeader::validate`];
/// [`crate::Engine::deliver`] validates again, so hand-built headers are
/// safe too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct WireHeader {
    /// Layout version.
    pub version: u8,
    /// Operation.
    pub op: Op,
    /// [`flags`] bits.
    pub flags: u16,
    /// Portal table index at the target.
    pub portal: u32,
    /// Sender.
    pub src: ProcessId,
    /// Receiver.
    pub dst: ProcessId,
    /// Match bits.
    pub match_bits: u64,
    /// Put/get: offset in the target MD (used by sender-managed MDs).
    /// Reply/ack: offset in the initiator's MD.
    pub offset: u64,
    /// Put/reply: payload bytes that follow. Get: bytes requested. Ack:
    /// bytes deposited.
    pub length: u64,
    /// Length the initiator requested.
    pub rlength: u64,
    /// Cookie of the initiator's MD ([`crate::MdHandle::to_cookie`]) or [`NO_MD`].
    pub return_md: u64,
    /// Get: where in the initiator's MD the reply goes.
    pub return_offset: u64,
    /// 64 bits of user data.
    pub hdr_data: u64,
}

const _: () = assert!(core::mem::size_of::<WireHeader>() == HEADER_LEN);

/// The fields of a plain put: a [`WireHeader`] of the current version with op
/// [`Op::Put`], no flags, `rlength == length`, `return_offset` 0 and no
/// return descriptor, whose other fields are these. A fabric that knows from
/// its own record that a message is such a put decodes straight into this
/// (no 80-byte header to build and read back) and hands it to
/// [`crate::Engine::deliver_plain_put_fast_taking`], which makes the remaining
/// checks of [`WireHeader::validate`] and of the general path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlainPut {
    /// Portal table index at the target.
    pub portal: u32,
    /// Sender.
    pub src: ProcessId,
    /// Receiver.
    pub dst: ProcessId,
    /// Match bits.
    pub match_bits: u64,
    /// Offset in the target MD (used by sender-managed MDs).
    pub offset: u64,
    /// Payload bytes.
    pub length: u64,
    /// 64 bits of user data.
    pub hdr_data: u64,
}

impl PlainPut {
    /// The full header this put stands for.
    pub fn to_wire(&self) -> WireHeader {
        WireHeader {
            version: WIRE_VERSION,
            op: Op::Put,
            flags: 0,
            portal: self.portal,
            src: self.src,
            dst: self.dst,
            match_bits: self.match_bits,
            offset: self.offset,
            length: self.length,
            rlength: self.length,
            return_md: NO_MD,
            return_offset: 0,
            hdr_data: self.hdr_data,
        }
    }

    /// The plain put `h` stands for, if it is one apart from its return
    /// descriptor and return offset (which a put without acknowledgment never
    /// uses): version, op, flags, `rlength == length`, and the one check
    /// [`WireHeader::validate`] makes of the return offset (`return_offset +
    /// rlength` does not overflow).
    #[inline(always)]
    pub fn from_wire(h: &WireHeader) -> Option<PlainPut> {
        let plain = (h.version == WIRE_VERSION)
            & (h.op == Op::Put)
            & (h.flags == 0)
            & (h.length == h.rlength)
            & h.return_offset.checked_add(h.rlength).is_some();
        plain.then_some(PlainPut {
            portal: h.portal,
            src: h.src,
            dst: h.dst,
            match_bits: h.match_bits,
            offset: h.offset,
            length: h.length,
            hdr_data: h.hdr_data,
        })
    }
}

#[inline]
fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[inline]
fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

impl WireHeader {
    /// Encode as 80 little-endian bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.version;
        b[1] = self.op as u8;
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.portal.to_le_bytes());
        b[8..12].copy_from_slice(&self.src.group.to_le_bytes());
        b[12..16].copy_from_slice(&self.src.rank.to_le_bytes());
        b[16..20].copy_from_slice(&self.dst.group.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst.rank.to_le_bytes());
        let words = [
            self.match_bits,
            self.offset,
            self.length,
            self.rlength,
            self.return_md,
            self.return_offset,
            self.hdr_data,
        ];
        for (i, w) in words.iter().enumerate() {
            b[24 + 8 * i..32 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decode the first [`HEADER_LEN`] bytes of `bytes` and validate every
    /// field against `limits`.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<WireHeader, HeaderError> {
        let b: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::Short(bytes.len()))?;
        if b[0] != WIRE_VERSION {
            return Err(HeaderError::Version { found: b[0] });
        }
        let op = Op::from_u8(b[1]).ok_or(HeaderError::Op(b[1]))?;
        let h = WireHeader {
            version: b[0],
            op,
            flags: u16::from_le_bytes([b[2], b[3]]),
            portal: u32_at(b, 4),
            src: ProcessId::new(u32_at(b, 8), u32_at(b, 12)),
            dst: ProcessId::new(u32_at(b, 16), u32_at(b, 20)),
            match_bits: u64_at(b, 24),
            offset: u64_at(b, 32),
            length: u64_at(b, 40),
            rlength: u64_at(b, 48),
            return_md: u64_at(b, 56),
            return_offset: u64_at(b, 64),
            hdr_data: u64_at(b, 72),
        };
        h.validate(limits)?;
        Ok(h)
    }

    /// Check every field: version, flags for the op, portal index, concrete
    /// source and destination, lengths against the maximum and against each
    /// other, offsets that do not overflow, presence of a return MD.
    #[inline]
    pub fn validate(&self, limits: &Limits) -> Result<(), HeaderError> {
        if self.version != WIRE_VERSION {
            return Err(HeaderError::Version {
                found: self.version,
            });
        }
        let allowed = match self.op {
            Op::Put => flags::ACK_REQ,
            Op::Get => 0,
            Op::Reply | Op::Ack => flags::TRUNCATED,
        };
        if self.flags & !allowed != 0 {
            return Err(HeaderError::Flags {
                flags: self.flags,
                op: self.op,
            });
        }
        // Replies and acks carry the target's portal index for information
        // only; the initiator's table may be smaller.
        let targets_portal = matches!(self.op, Op::Put | Op::Get);
        if targets_portal & (self.portal >= limits.portals) {
            return Err(HeaderError::Portal {
                portal: self.portal,
                limit: limits.portals,
            });
        }
        if (self.src.group == ANY)
            | (self.src.rank == ANY)
            | (self.dst.group == ANY)
            | (self.dst.rank == ANY)
        {
            return Err(HeaderError::Wildcard);
        }
        let longest = if self.length > self.rlength {
            self.length
        } else {
            self.rlength
        };
        if longest > limits.max_message {
            return Err(HeaderError::Length {
                length: longest,
                max: limits.max_message,
            });
        }
        let lengths_ok = match self.op {
            Op::Put | Op::Get => self.length == self.rlength,
            Op::Reply | Op::Ack => self.length <= self.rlength,
        };
        if !lengths_ok {
            return Err(HeaderError::Lengths {
                op: self.op,
                length: self.length,
                rlength: self.rlength,
            });
        }
        if self.offset.checked_add(self.length).is_none()
            || self.return_offset.checked_add(self.rlength).is_none()
        {
            return Err(HeaderError::Offset);
        }
        let needs_md = match self.op {
            Op::Put => self.flags & flags::ACK_REQ != 0,
            Op::Get | Op::Reply | Op::Ack => true,
        };
        if needs_md & (self.return_md == NO_MD) {
            return Err(HeaderError::ReturnMd(self.op));
        }
        Ok(())
    }

    /// True when a put asks for an acknowledgment.
    pub const fn ack_requested(&self) -> bool {
        self.flags & flags::ACK_REQ != 0
    }

    /// True when an ack or reply reports truncation.
    pub const fn truncated(&self) -> bool {
        self.flags & flags::TRUNCATED != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        portals: 8,
        max_message: 1 << 20,
    };

    fn put() -> WireHeader {
        WireHeader {
            version: WIRE_VERSION,
            op: Op::Put,
            flags: flags::ACK_REQ,
            portal: 3,
            src: ProcessId::new(7, 1),
            dst: ProcessId::new(7, 2),
            match_bits: 0xdead_beef,
            offset: 16,
            length: 100,
            rlength: 100,
            return_md: 5,
            return_offset: 0,
            hdr_data: 42,
        }
    }

    #[test]
    fn round_trip_is_exact_and_little_endian() {
        let h = put();
        let b = h.encode();
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 1);
        assert_eq!(&b[4..8], &[3, 0, 0, 0]);
        assert_eq!(&b[24..28], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(WireHeader::decode(&b, &L), Ok(h));
    }

    #[test]
    fn every_field_is_validated() {
        let mut b = put().encode();
        assert_eq!(
            WireHeader::decode(&b[..79], &L),
            Err(HeaderError::Short(79))
        );
        b[0] = 2;
        assert_eq!(
            WireHeader::decode(&b, &L),
            Err(HeaderError::Version { found: 2 })
        );
        let mut b = put().encode();
        b[1] = 9;
        assert_eq!(WireHeader::decode(&b, &L), Err(HeaderError::Op(9)));

        let bad = |f: &dyn Fn(&mut WireHeader)| {
            let mut h = put();
            f(&mut h);
            WireHeader::decode(&h.encode(), &L)
        };
        assert!(matches!(
            bad(&|h| h.flags = 0x80),
            Err(HeaderError::Flags { .. })
        ));
        assert!(matches!(
            bad(&|h| h.flags = flags::TRUNCATED),
            Err(HeaderError::Flags { .. })
        ));
        assert!(matches!(
            bad(&|h| h.portal = 8),
            Err(HeaderError::Portal { .. })
        ));
        assert_eq!(bad(&|h| h.src.rank = ANY), Err(HeaderError::Wildcard));
        assert_eq!(bad(&|h| h.dst.group = ANY), Err(HeaderError::Wildcard));
        assert!(matches!(
            bad(&|h| {
                h.length = (1 << 20) + 1;
                h.rlength = h.length
            }),
            Err(HeaderError::Length { .. })
        ));
        assert!(matches!(
            bad(&|h| h.rlength = 99),
            Err(HeaderError::Lengths { .. })
        ));
        assert_eq!(bad(&|h| h.offset = u64::MAX - 50), Err(HeaderError::Offset));
        assert_eq!(
            bad(&|h| h.return_md = NO_MD),
            Err(HeaderError::ReturnMd(Op::Put))
        );
        // A put without ack needs no return MD.
        assert!(bad(&|h| {
            h.return_md = NO_MD;
            h.flags = 0
        })
        .is_ok());
        // A reply or ack may name a portal beyond the initiator's table.
        assert!(bad(&|h| {
            h.op = Op::Ack;
            h.flags = 0;
            h.portal = 1000
        })
        .is_ok());
        // Ack may report fewer bytes than requested, never more.
        assert!(bad(&|h| {
            h.op = Op::Ack;
            h.flags = flags::TRUNCATED;
            h.length = 10
        })
        .is_ok());
        assert!(matches!(
            bad(&|h| {
                h.op = Op::Reply;
                h.flags = 0;
                h.length = 101
            }),
            Err(HeaderError::Lengths { .. })
        ));
    }
}
