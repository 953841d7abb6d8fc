//! Tracepoint field offsets from tracefs.
//!
//! Offsets differ between kernels and configurations, so they are read from
//! `<tracefs>/events/<group>/<event>/format` at start-up and handed to the
//! kernel programs as a global (DESIGN §2); nothing is hard-coded.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use sigwake_common::TracepointOffsets;

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    /// Neither mount point has events and mounting tracefs failed.
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed; \
         mount it with `mount -t tracefs nodev /sys/kernel/tracing` (needs root)"
    )]
    NotMounted(#[source] std::io::Error),
    /// tracefs is there but this user may not read it.
    #[error(
        "cannot read tracefs at {0}: permission denied; sigwake needs root (or CAP_BPF and CAP_PERFMON with read access to tracefs)"
    )]
    Permission(PathBuf),
    /// A format file could not be read.
    #[error("reading {path}: {source}; is the tracepoint compiled into this kernel?")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The format file lacks a field the programs need.
    #[error("tracepoint {event} has no field `{field}` (this kernel's format differs from what sigwake knows)")]
    MissingField { event: String, field: String },
    /// Two records the programs read the same way place a field differently.
    #[error(
        "tracepoint {event} has `{field}` at offset {offset}, not {expected} like sys_exit_write; sigwake reads them with one program"
    )]
    FieldOffset { event: String, field: String, offset: u32, expected: u32 },
    /// A field has a size the programs do not read.
    #[error("tracepoint {event} field `{field}` is {size} bytes; sigwake reads {expected}")]
    FieldSize { event: String, field: String, size: u32, expected: u32 },
}

/// One `field:` line of a format file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parses the `field:` lines of a tracepoint format file into name → field.
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("field:") else { continue };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            } else if !part.is_empty() && !part.contains(':') && decl.is_none() {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else { continue };
        // "char comm[16]" -> "comm"; "const char * buf" -> "buf"
        let name = decl.rsplit([' ', '*']).next().unwrap_or(decl);
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_string(), Field { offset, size });
    }
    fields
}

/// The tracefs mount point, mounting it if neither usual place has events.
pub fn tracefs_root() -> Result<PathBuf, TracefsError> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        match std::fs::metadata(Path::new(dir).join("events")) {
            Ok(m) if m.is_dir() => return Ok(PathBuf::from(dir)),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(TracefsError::Permission(PathBuf::from(dir)));
            }
            _ => {}
        }
    }
    rustix::mount::mount("nodev", "/sys/kernel/tracing", "tracefs", rustix::mount::MountFlags::empty(), None)
        .map_err(|e| TracefsError::NotMounted(e.into()))?;
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

struct Format {
    event: String,
    fields: HashMap<String, Field>,
}

impl Format {
    fn read(root: &Path, group: &str, event: &str) -> Result<Self, TracefsError> {
        let path = root.join("events").join(group).join(event).join("format");
        let text =
            std::fs::read_to_string(&path).map_err(|source| TracefsError::Read { path: path.clone(), source })?;
        Ok(Format { event: format!("{group}:{event}"), fields: parse_format(&text) })
    }

    /// Offset of `name`, checking that it is `size` bytes wide (the width
    /// the kernel program reads).
    fn offset(&self, name: &str, size: u32) -> Result<u32, TracefsError> {
        let field = self
            .fields
            .get(name)
            .ok_or_else(|| TracefsError::MissingField { event: self.event.clone(), field: name.to_string() })?;
        if field.size != size {
            return Err(TracefsError::FieldSize {
                event: self.event.clone(),
                field: name.to_string(),
                size: field.size,
                expected: size,
            });
        }
        Ok(field.offset)
    }
}

/// Every offset the kernel programs use, and which optional fields this
/// kernel has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFormats {
    pub offsets: TracepointOffsets,
    /// `sched_process_exit` has `group_dead` (6.16+); without it the
    /// programs learn "last thread of the process" another way.
    pub has_exit_group_dead: bool,
}

/// Reads every offset the kernel programs use.
pub fn read_offsets(root: &Path) -> Result<KernelFormats, TracefsError> {
    let generate = Format::read(root, "signal", "signal_generate")?;
    let deliver = Format::read(root, "signal", "signal_deliver")?;
    let enter_write = Format::read(root, "syscalls", "sys_enter_write")?;
    let enter_writev = Format::read(root, "syscalls", "sys_enter_writev")?;
    let enter_sendto = Format::read(root, "syscalls", "sys_enter_sendto")?;
    let enter_sendmsg = Format::read(root, "syscalls", "sys_enter_sendmsg")?;
    let exit_write = Format::read(root, "syscalls", "sys_exit_write")?;
    let exit = Format::read(root, "sched", "sched_process_exit")?;
    // One exit program serves all four calls: their exit records must agree.
    let ret = exit_write.offset("ret", 8)?;
    for event in ["sys_exit_writev", "sys_exit_sendto", "sys_exit_sendmsg"] {
        let other = Format::read(root, "syscalls", event)?.offset("ret", 8)?;
        if other != ret {
            return Err(TracefsError::FieldOffset {
                event: format!("syscalls:{event}"),
                field: "ret".into(),
                offset: other,
                expected: ret,
            });
        }
    }
    let group_dead = match exit.offset("group_dead", 1) {
        Ok(offset) => Some(offset),
        Err(TracefsError::MissingField { .. }) => None,
        Err(e) => return Err(e),
    };
    let offsets = TracepointOffsets {
        gen_sig: generate.offset("sig", 4)?,
        gen_code: generate.offset("code", 4)?,
        gen_comm: generate.offset("comm", 16)?,
        gen_pid: generate.offset("pid", 4)?,
        gen_group: generate.offset("group", 4)?,
        gen_result: generate.offset("result", 4)?,
        deliver_sig: deliver.offset("sig", 4)?,
        deliver_code: deliver.offset("code", 4)?,
        deliver_sa_handler: deliver.offset("sa_handler", 8)?,
        deliver_sa_flags: deliver.offset("sa_flags", 8)?,
        write_fd: enter_write.offset("fd", 8)?,
        write_count: enter_write.offset("count", 8)?,
        write_ret: ret,
        writev_fd: enter_writev.offset("fd", 8)?,
        writev_vec: enter_writev.offset("vec", 8)?,
        writev_vlen: enter_writev.offset("vlen", 8)?,
        sendto_fd: enter_sendto.offset("fd", 8)?,
        sendto_len: enter_sendto.offset("len", 8)?,
        sendmsg_fd: enter_sendmsg.offset("fd", 8)?,
        sendmsg_msg: enter_sendmsg.offset("msg", 8)?,
        exit_pid: exit.offset("pid", 4)?,
        exit_group_dead: group_dead.unwrap_or(0),
        _pad0: 0,
    };
    Ok(KernelFormats { offsets, has_exit_group_dead: group_dead.is_some() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GENERATE: &str = "name: signal_generate
ID: 261
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int sig;\toffset:8;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:20;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:36;\tsize:4;\tsigned:1;
\tfield:const char * buf;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"sig=%d\", REC->sig
";

    #[test]
    fn parses_fields_arrays_and_pointers() {
        let f = parse_format(GENERATE);
        assert_eq!(f["sig"], Field { offset: 8, size: 4 });
        assert_eq!(f["comm"], Field { offset: 20, size: 16 });
        assert_eq!(f["pid"], Field { offset: 36, size: 4 });
        assert_eq!(f["buf"], Field { offset: 24, size: 8 });
        assert_eq!(f["common_pid"], Field { offset: 4, size: 4 });
    }

    #[test]
    fn missing_and_wrong_size_fields_are_errors() {
        let fmt = Format { event: "signal:signal_generate".into(), fields: parse_format(GENERATE) };
        assert!(matches!(fmt.offset("result", 4), Err(TracefsError::MissingField { .. })));
        let err = fmt.offset("sig", 8).unwrap_err();
        assert!(err.to_string().contains("is 4 bytes; sigwake reads 8"), "{err}");
    }

    /// A tracefs tree with the events the programs read, `exit_fields`
    /// being sched_process_exit's fields after `pid`.
    fn fake_tracefs(exit_extra: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let field =
            |decl: &str, off: u32, size: u32| format!("\tfield:{decl};\toffset:{off};\tsize:{size};\tsigned:0;\n");
        let args = |names: &[&str]| -> String {
            let mut f = field("int __syscall_nr", 8, 4);
            for (i, n) in names.iter().enumerate() {
                f += &field(&format!("unsigned long {n}"), 16 + 8 * i as u32, 8);
            }
            f
        };
        let exit_ret = field("int __syscall_nr", 8, 4) + &field("long ret", 16, 8);
        let events: Vec<(&str, &str, String)> = vec![
            (
                "signal",
                "signal_generate",
                field("int sig", 8, 4)
                    + &field("int errno", 12, 4)
                    + &field("int code", 16, 4)
                    + &field("char comm[16]", 20, 16)
                    + &field("pid_t pid", 36, 4)
                    + &field("int group", 40, 4)
                    + &field("int result", 44, 4),
            ),
            (
                "signal",
                "signal_deliver",
                field("int sig", 8, 4)
                    + &field("int errno", 12, 4)
                    + &field("int code", 16, 4)
                    + &field("unsigned long sa_handler", 24, 8)
                    + &field("unsigned long sa_flags", 32, 8),
            ),
            ("syscalls", "sys_enter_write", args(&["fd", "buf", "count"])),
            ("syscalls", "sys_enter_writev", args(&["fd", "vec", "vlen"])),
            ("syscalls", "sys_enter_sendto", args(&["fd", "buff", "len", "flags", "addr", "addr_len"])),
            ("syscalls", "sys_enter_sendmsg", args(&["fd", "msg", "flags"])),
            ("syscalls", "sys_exit_write", exit_ret.clone()),
            ("syscalls", "sys_exit_writev", exit_ret.clone()),
            ("syscalls", "sys_exit_sendto", exit_ret.clone()),
            ("syscalls", "sys_exit_sendmsg", exit_ret),
            (
                "sched",
                "sched_process_exit",
                field("char comm[16]", 8, 16) + &field("pid_t pid", 24, 4) + &field("int prio", 28, 4) + exit_extra,
            ),
        ];
        for (group, event, fields) in events {
            let d = dir.path().join("events").join(group).join(event);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("format"), format!("name: {event}\nID: 1\nformat:\n{fields}\nprint fmt: \"\"\n"))
                .unwrap();
        }
        dir
    }

    #[test]
    fn group_dead_is_used_where_present_and_optional_where_not() {
        let new = fake_tracefs("\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n");
        let f = read_offsets(new.path()).unwrap();
        assert!(f.has_exit_group_dead);
        assert_eq!(f.offsets.exit_group_dead, 32);
        assert_eq!((f.offsets.sendto_fd, f.offsets.sendto_len, f.offsets.sendmsg_msg), (16, 32, 24));
        // 5.10 to 6.15: no group_dead. Not a refusal to start.
        let old = fake_tracefs("");
        let f = read_offsets(old.path()).unwrap();
        assert!(!f.has_exit_group_dead);
        assert_eq!(f.offsets.write_ret, 16);
    }

    #[test]
    fn exit_records_that_disagree_on_ret_are_refused() {
        let dir = fake_tracefs("");
        let p = dir.path().join("events/syscalls/sys_exit_sendto/format");
        std::fs::write(&p, "format:\n\tfield:long ret;\toffset:24;\tsize:8;\tsigned:1;\n").unwrap();
        let err = read_offsets(dir.path()).unwrap_err();
        assert!(err.to_string().contains("sys_exit_sendto has `ret` at offset 24"), "{err}");
    }
}
