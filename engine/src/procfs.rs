//! Parsers for the /proc files the engine reads.

use crate::error::{Error, Result};
use std::path::Path;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    /// The path or `[name]`, if any.
    pub path: Option<String>,
}

impl MapsEntry {
    /// `PROT_*` bits of this area.
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        if self.exec {
            p |= libc::PROT_EXEC;
        }
        p as u32
    }
}

fn hex(what: &str, s: &str) -> Result<u64> {
    u64::from_str_radix(s, 16).map_err(|_| Error::parse(what, s))
}

/// Parse the text of a maps file.
pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(6, ' ');
        let mut next = || it.next().ok_or_else(|| Error::parse("maps line", line));
        let range = next()?;
        let perms = next()?.as_bytes().to_vec();
        let offset = next()?;
        let _dev = next()?;
        let inode = next()?;
        let rest = it.next().unwrap_or("").trim_start();
        let (s, e) = range
            .split_once('-')
            .ok_or_else(|| Error::parse("maps range", line))?;
        if perms.len() < 4 {
            return Err(Error::parse("maps permissions", line));
        }
        out.push(MapsEntry {
            start: hex("maps start", s)?,
            end: hex("maps end", e)?,
            read: perms[0] == b'r',
            write: perms[1] == b'w',
            exec: perms[2] == b'x',
            shared: perms[3] == b's',
            offset: hex("maps offset", offset)?,
            inode: inode
                .parse()
                .map_err(|_| Error::parse("maps inode", line))?,
            path: (!rest.is_empty()).then(|| rest.to_string()),
        });
    }
    Ok(out)
}

/// Read and parse /proc/PID/maps.
pub fn maps(pid: i32) -> Result<Vec<MapsEntry>> {
    parse_maps(&read(pid, "maps")?)
}

/// Read /proc/PID/NAME as text.
pub fn read(pid: i32, name: &str) -> Result<String> {
    let p = format!("/proc/{pid}/{name}");
    std::fs::read_to_string(&p).map_err(|e| Error::io(format!("read {p}"), e))
}

/// The fields of /proc/PID/stat after the command name; `field(n)` gives
/// field number n as numbered in proc(5) (1-based).
pub struct Stat {
    fields: Vec<String>,
}

impl Stat {
    /// Field `n` (proc(5) numbering, n >= 3) as a number.
    pub fn field(&self, n: usize) -> Result<u64> {
        let s = n
            .checked_sub(3)
            .and_then(|i| self.fields.get(i))
            .ok_or_else(|| Error::parse("stat", format!("no field {n}")))?;
        s.parse::<i64>()
            .map(|v| v as u64)
            .map_err(|_| Error::parse("stat field", s.clone()))
    }
    /// The state letter (field 3).
    pub fn state(&self) -> char {
        self.fields
            .first()
            .and_then(|s| s.chars().next())
            .unwrap_or('?')
    }
}

/// Read /proc/PID/stat.
pub fn stat(pid: i32) -> Result<Stat> {
    let text = read(pid, "stat")?;
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| Error::parse("stat", &text))?;
    Ok(Stat {
        fields: after.split_whitespace().map(str::to_string).collect(),
    })
}

/// A `Key:\tvalue` field of /proc/PID/status (or task status).
pub fn status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// The thread ids of a process, main thread first.
pub fn tasks(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {dir}"), e))?;
    let mut tids: Vec<i32> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    tids.sort_by_key(|&t| (t != pid, t));
    Ok(tids)
}

/// True if a process or thread with this id exists in our PID namespace.
pub fn exists(id: i32) -> bool {
    Path::new(&format!("/proc/{id}")).exists()
}

/// The target of a symlink under /proc/PID.
pub fn link(pid: i32, name: &str) -> Result<String> {
    let p = format!("/proc/{pid}/{name}");
    std::fs::read_link(&p)
        .map(|t| t.to_string_lossy().into_owned())
        .map_err(|e| Error::io(format!("readlink {p}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "55d0c0a00000-55d0c0a02000 r--p 00000000 08:01 1234                       /usr/bin/cat\n\
7ffd1c1f0000-7ffd1c211000 rw-p 00000000 00:00 0                          [stack]\n\
7f0000000000-7f0000001000 rw-s 00001000 00:05 99 /dev/zero (deleted)\n\
7f0000002000-7f0000003000 ---p 00000000 00:00 0 \n";
        let m = parse_maps(text).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].start, 0x55d0c0a00000);
        assert_eq!(m[0].path.as_deref(), Some("/usr/bin/cat"));
        assert_eq!(m[0].prot(), libc::PROT_READ as u32);
        assert_eq!(m[1].path.as_deref(), Some("[stack]"));
        assert!(m[2].shared && m[2].offset == 0x1000 && m[2].inode == 99);
        assert_eq!(m[2].path.as_deref(), Some("/dev/zero (deleted)"));
        assert_eq!(m[3].path, None);
        assert_eq!(m[3].prot(), 0);
    }

    #[test]
    fn stat_of_self() {
        let s = stat(std::process::id() as i32).unwrap();
        assert_eq!(
            s.field(4).unwrap() as u32,
            std::os::unix::process::parent_id()
        );
        assert!(s.field(47).unwrap() > 0); // start_brk
    }
}
