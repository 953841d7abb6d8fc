//! Kernel struct member offsets from BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Only what the kernel programs need where a tracepoint lacks a field:
//! `task_struct.signal` and `signal_struct.live`, which tell the last
//! exiting thread of a process on kernels whose `sched_process_exit` has no
//! `group_dead` (before 6.16). The format is small and stable
//! (Documentation/bpf/btf.rst), so it is read here directly rather than
//! through aya-obj, whose parsed types keep their members private.

use std::path::Path;

const MAGIC: u16 = 0xeb9f;

// BTF_KIND_* (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    /// The blob is not BTF, or is cut short.
    #[error("not a valid BTF blob: {0}")]
    Malformed(&'static str),
    /// A kind number this parser does not know (a newer kernel).
    #[error("BTF type kind {0} is unknown to this sigwake")]
    UnknownKind(u32),
    /// The struct or member is not in this kernel's BTF.
    #[error("BTF has no member `{member}` in struct {strukt}")]
    NotFound { strukt: String, member: String },
}

#[derive(Clone, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset within the struct.
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// Byte size of a struct or union (the word that is a type id for
    /// other kinds).
    size: u32,
    members: Vec<Member>,
}

/// Parsed struct/union types of one BTF blob.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, String> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Btf::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (only little-endian BTF is read)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let section = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some((s, s.checked_add(len)?)))
                .and_then(|(s, e)| b.get(s..e))
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let tb = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut types = vec![Type { name_off: 0, kind: 0, size: 0, members: Vec::new() }];
        let mut at = 0usize;
        while at < tb.len() {
            let name_off = u32_at(tb, at)?;
            let info = u32_at(tb, at + 4)?;
            let size = u32_at(tb, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(tb, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(tb, m)?,
                            type_id: u32_at(tb, m + 4)?,
                            // kind_flag: low 24 bits are the bit offset,
                            // high 8 the bitfield size.
                            bit_offset: if kind_flag { offset & 0xff_ffff } else { offset },
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                other => return Err(BtfError::UnknownKind(other)),
            };
            at += extra;
            if at > tb.len() {
                return Err(BtfError::Malformed("type runs past its section"));
            }
            types.push(Type { name_off, kind, size, members });
        }
        Ok(Btf { strings, types })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
    }

    /// Byte offset of `member` in `struct strukt`, looking through
    /// anonymous struct and union members.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::NotFound { strukt: strukt.into(), member: member.into() };
        let id = self.struct_id(strukt).ok_or_else(not_found)?;
        let bits = self.find(id, member.as_bytes(), 0).ok_or_else(not_found)?;
        if bits % 8 != 0 {
            return Err(not_found());
        }
        Ok(bits / 8)
    }

    /// `sizeof(struct strukt)`.
    pub fn struct_size(&self, strukt: &str) -> Result<u32, BtfError> {
        let id = self
            .struct_id(strukt)
            .ok_or_else(|| BtfError::NotFound { strukt: strukt.into(), member: "(its size)".into() })?;
        Ok(self.types[id].size)
    }

    /// The id of the definition (not a forward declaration) of a struct.
    fn struct_id(&self, strukt: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == strukt.as_bytes() && !t.members.is_empty())
    }

    fn find(&self, id: usize, member: &[u8], depth: u32) -> Option<u32> {
        let t = self.types.get(id)?;
        for m in &t.members {
            if self.name(m.name_off) == member {
                return Some(m.bit_offset);
            }
        }
        if depth > 8 {
            return None;
        }
        t.members
            .iter()
            .filter(|m| m.name_off == 0 || self.name(m.name_off).is_empty())
            .filter_map(|m| {
                let inner = self.types.get(m.type_id as usize)?;
                matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    .then(|| self.find(m.type_id as usize, member, depth + 1).map(|o| o + m.bit_offset))
                    .flatten()
            })
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built blob: int; struct anon { int live; }; struct
    /// signal_struct { int a; struct anon; } with the anonymous member at
    /// byte 8.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0live\0a\0signal_struct\0".to_vec();
        let (int, live, a, sig) = (1u32, 5u32, 10u32, 12u32);
        let mut types = Vec::new();
        let mut push = |words: &[u32]| types.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        push(&[int, KIND_INT << 24, 4, 32]); // id 1
        push(&[0, KIND_STRUCT << 24 | 1, 4, live, 1, 0]); // id 2: anon { live @0 }
        push(&[sig, KIND_STRUCT << 24 | 2, 16, a, 1, 0, 0, 2, 64]); // id 3
        let mut b = Vec::new();
        b.extend(MAGIC.to_le_bytes());
        b.extend([1u8, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            b.extend(w.to_le_bytes());
        }
        b.extend(types);
        b.extend(strings);
        b
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_structs() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("signal_struct", "a"), Ok(0));
        assert_eq!(btf.member_offset("signal_struct", "live"), Ok(8));
        assert!(matches!(btf.member_offset("signal_struct", "nope"), Err(BtfError::NotFound { .. })));
        assert!(matches!(btf.member_offset("task_struct", "signal"), Err(BtfError::NotFound { .. })));
        assert_eq!(btf.struct_size("signal_struct"), Ok(16));
        assert!(btf.struct_size("task_struct").is_err());
    }

    #[test]
    fn truncated_or_foreign_blobs_are_errors_not_panics() {
        let b = blob();
        for len in 0..b.len() {
            let _ = Btf::parse(&b[..len]);
        }
        assert!(Btf::parse(&b[..30]).is_err());
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
    }

    #[test]
    fn this_kernels_btf_has_the_exit_offsets() {
        // The kernels this project runs its tests on all have BTF.
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let signal = btf.member_offset("task_struct", "signal").unwrap();
        let live = btf.member_offset("signal_struct", "live").unwrap();
        assert!(signal > 0 && live > 0, "{signal} {live}");
        // What the socket tier reads a handler's restorer with (x86_64's
        // struct sigaction: handler, flags, restorer, mask).
        assert_eq!(btf.struct_size("k_sigaction"), Ok(32));
        assert_eq!(btf.member_offset("sigaction", "sa_restorer"), Ok(16));
    }
}
