//! Tests of the file kinds (both directions).
//!
//! Dump side: scripted children ([`ScriptChild`]) set up exactly the fds a
//! test wants, are frozen, and a [`FileCollector`] reads them. Restore side:
//! a hand-built or collected [`TreeImage`] is opened once by the agent
//! ([`Opened::open_all`]) and installed into stubs
//! ([`crate::testutil::with_stub`]), which are then inspected through
//! `/proc` and `pidfd_getfd` copies of their fds.

use super::testkit::{cs, frozen, image, pattern, process, scene, Act, ScriptChild, TempDir};
use super::*;
use crate::testutil::{with_stub, StubGuard};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;

const CLOEXEC: u32 = libc::O_CLOEXEC as u32;
/// The kernel's `O_LARGEFILE` (libc says 0 on x86-64, fdinfo shows it).
const LARGEFILE: u32 = 0o100000;
const KEEP: u32 = !LARGEFILE;
const RDONLY: u32 = libc::O_RDONLY as u32;
const WRONLY: u32 = libc::O_WRONLY as u32;
const RDWR: u32 = libc::O_RDWR as u32;
const APPEND: u32 = libc::O_APPEND as u32;
const NONBLOCK: u32 = libc::O_NONBLOCK as u32;

// ---------------------------------------------------------------- helpers

/// What a [`FileCollector`] made of some processes.
#[derive(Debug)]
struct Collected {
    /// The fds of each process, in the order the pids were given.
    fds: Vec<Vec<FdEntry>>,
    files: Vec<OpenFile>,
    pipes: Vec<PipeObject>,
    deleted: Vec<DeletedFile>,
}

impl Collected {
    /// The entry of fd `fd` of the `task`-th process.
    fn entry(&self, task: usize, fd: i32) -> FdEntry {
        *self.fds[task]
            .iter()
            .find(|e| e.fd == fd)
            .unwrap_or_else(|| panic!("task {task} has no fd {fd}: {:?}", self.fds[task]))
    }

    /// The open file of fd `fd` of the `task`-th process.
    fn file(&self, task: usize, fd: i32) -> &OpenFile {
        let id = self.entry(task, fd).file;
        self.files
            .iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("open file {id} of fd {fd} missing: {:?}", self.files))
    }

    /// The fd numbers of the `task`-th process.
    fn numbers(&self, task: usize) -> Vec<i32> {
        self.fds[task].iter().map(|e| e.fd).collect()
    }

    /// The open files and pipes with every pipe id set to 0 (a restored
    /// pipe is a new pipe; only its shape must match).
    fn without_pipe_ids(&self) -> (Vec<OpenFile>, Vec<PipeObject>) {
        let files = self
            .files
            .iter()
            .cloned()
            .map(|mut f| {
                if let FileKind::Pipe { pipe, .. } = &mut f.kind {
                    *pipe = 0;
                }
                f
            })
            .collect();
        let pipes = self
            .pipes
            .iter()
            .cloned()
            .map(|mut p| {
                p.id = 0;
                p
            })
            .collect();
        (files, pipes)
    }
}

/// Collect the files of `pids` (frozen) as one tree.
fn try_collect(pids: &[i32]) -> Result<Collected> {
    frozen(pids, || {
        let mut files = FileCollector::new();
        let mut shmem = ShmemCollector::new();
        let mut fds = Vec::new();
        for &pid in pids {
            fds.push(files.task(pid, &mut shmem)?);
        }
        let (files, pipes, deleted) = files.finish()?;
        Ok(Collected {
            fds,
            files,
            pipes,
            deleted,
        })
    })
}

fn collect(pids: &[i32]) -> Collected {
    try_collect(pids).expect("collect")
}

/// Collecting `acts` fails on fd `fd` with a kind that mentions `needle`.
fn expect_unsupported(acts: &[Act], fd: i32, needle: &str) {
    let child = ScriptChild::spawn(acts);
    let r = try_collect(&[child.pid]);
    let msg = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    match r {
        Err(Error::UnsupportedFd { pid, fd: efd, kind }) => {
            assert_eq!((pid, efd), (child.pid, fd));
            assert!(kind.contains(needle), "{kind:?} lacks {needle:?}");
            assert!(msg.contains(&format!("fd {fd} ")), "{msg}");
        }
        other => panic!("expected UnsupportedFd for fd {fd}, got {other:?}"),
    }
}

/// The image of what was collected from `pids`.
fn image_of(pids: &[i32], c: &Collected) -> TreeImage {
    let tasks = pids
        .iter()
        .zip(&c.fds)
        .map(|(&pid, fds)| process(pid, fds.clone()))
        .collect();
    let mut img = image(tasks, c.files.clone(), c.pipes.clone());
    img.deleted = c.deleted.clone();
    img
}

fn fd(fd: i32, cloexec: bool, file: FileId) -> FdEntry {
    FdEntry { fd, cloexec, file }
}

fn open_file(id: FileId, flags: i32, pos: u64, kind: FileKind) -> OpenFile {
    OpenFile {
        id,
        flags: flags as u32,
        pos,
        kind,
    }
}

fn regular(path: &str) -> FileKind {
    let md = std::fs::metadata(path).expect("stat");
    FileKind::Regular {
        path: path.to_string(),
        dev: md.dev(),
        ino: md.ino(),
    }
}

/// A stdio policy logging into `dir` (in a directory that does not exist
/// yet).
fn policy(dir: &TempDir) -> StdioPolicy {
    StdioPolicy {
        log: dir.path.join("logs").join("stdio.log"),
    }
}

/// Open `tree` in the agent.
fn open_tree(tree: &TreeImage, stdio: &StdioPolicy) -> Opened {
    Opened::open_all(tree, &ShmemHandles::default(), stdio).expect("open_all")
}

/// A stub holding the fds of the `task`-th process of `tree`.
fn restore_task(tree: &TreeImage, task: usize, opened: &Opened) -> StubGuard {
    let (guard, r) = with_stub(true, |_, inj| install(inj, &tree.tasks[task].fds, opened));
    r.expect("install");
    guard
}

fn fd_list(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .to_str()
                .and_then(|s| s.parse().ok())
                .expect("number")
        })
        .collect();
    v.sort_unstable();
    v
}

/// (flags incl. O_CLOEXEC, pos) from fdinfo, read independently of the
/// code under test.
fn fdinfo(pid: i32, fd: i32) -> (u32, u64) {
    let t = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    let get = |k: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .expect("field")
            .to_string()
    };
    (
        u32::from_str_radix(&get("flags:"), 8).expect("flags"),
        get("pos:").parse().expect("pos"),
    )
}

fn pos(pid: i32, fd: i32) -> u64 {
    fdinfo(pid, fd).1
}

fn link(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .expect("readlink")
        .to_string_lossy()
        .into_owned()
}

/// A copy of fd `fd` of `pid` (the same open file description).
fn copy_fd(pid: i32, fd: i32) -> std::fs::File {
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
    std::fs::File::from(sys::pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd"))
}

/// Read everything waiting in the pipe at `fd` of `pid`.
fn drain_pipe(pid: i32, fd: i32) -> Vec<u8> {
    let mut r = copy_fd(pid, fd);
    let n = sys::fionread(r.as_fd()).expect("FIONREAD");
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).expect("read");
    buf
}

/// Do fd `fd1` of `pid1` and fd `fd2` of `pid2` share one description?
fn same(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> bool {
    sys::same_file(pid1, fd1, pid2, fd2).expect("kcmp")
}

/// The inode of a pipe end of ours, as in `pipe:[INO]`.
fn pipe_ino(f: &OwnedFd) -> u64 {
    sys::fstat(f.as_fd()).expect("fstat").st_ino
}

// -------------------------------------------------------------- dump side

#[test]
fn fdinfo_parsing() {
    let t = "pos:\t1234\nflags:\t02100002\nmnt_id:\t25\nino:\t77\n";
    assert_eq!(parse_fdinfo(t), Ok((0o2100002, 1234)));
    assert!(parse_fdinfo("pos:\t1\n").is_err());
    assert!(parse_fdinfo("pos:\tx\nflags:\t0\n").is_err());
    assert!(parse_fdinfo("pos:\t1\nflags:\t9\n").is_err());
}

#[test]
fn collect_files_dirs_devices_and_pipe() {
    let dir = TempDir::new("dump");
    let (acts, data) = scene(&dir);
    let child = ScriptChild::spawn(&acts);
    let c = collect(&[child.pid]);

    let nums = c.numbers(0);
    assert_eq!(nums, vec![0, 3, 4, 5, 7, 9, 10]);
    // Every fd was opened on its own: one description each.
    assert_eq!(c.files.len(), nums.len(), "{:?}", c.files);
    let mut ids: Vec<FileId> = c.fds[0].iter().map(|e| e.file).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), nums.len(), "{:?}", c.fds[0]);

    let a_md = std::fs::metadata(dir.file("a")).expect("stat a");
    let b_md = std::fs::metadata(dir.file("b")).expect("stat b");
    let null_md = std::fs::metadata("/dev/null").expect("stat null");

    let f = c.file(0, 0);
    assert_eq!(
        f.kind,
        FileKind::CharDevice {
            path: "/dev/null".into(),
            rdev: null_md.rdev()
        }
    );
    assert_eq!(f.flags & KEEP, RDONLY);
    assert!(!c.entry(0, 0).cloexec);

    let f = c.file(0, 3);
    assert_eq!(
        f.kind,
        FileKind::Regular {
            path: dir.file("a"),
            dev: a_md.dev(),
            ino: a_md.ino()
        }
    );
    assert_eq!((f.pos, c.entry(0, 3).cloexec), (1234, true));
    assert_eq!(f.flags & KEEP, RDONLY);

    let f = c.file(0, 4);
    assert_eq!(
        f.kind,
        FileKind::Regular {
            path: dir.file("b"),
            dev: b_md.dev(),
            ino: b_md.ino()
        }
    );
    assert_eq!((f.pos, c.entry(0, 4).cloexec), (7, false));
    assert_eq!(f.flags & KEEP, WRONLY | APPEND);

    let f = c.file(0, 5);
    assert_eq!(
        f.kind,
        FileKind::Directory {
            path: dir.path.to_string_lossy().into_owned()
        }
    );
    assert_ne!(f.flags & libc::O_DIRECTORY as u32, 0);

    let (f7, f9) = (c.file(0, 7), c.file(0, 9));
    let FileKind::Pipe {
        pipe: p7,
        write_end: w7,
    } = f7.kind
    else {
        panic!("fd 7 not a pipe: {f7:?}")
    };
    let FileKind::Pipe {
        pipe: p9,
        write_end: w9,
    } = f9.kind
    else {
        panic!("fd 9 not a pipe: {f9:?}")
    };
    assert_eq!(p7, p9);
    assert!(w7 && !w9);
    assert_eq!(
        c.pipes,
        vec![PipeObject {
            id: p7,
            capacity: 65536,
            data: data.clone()
        }]
    );
    assert!(c.entry(0, 7).cloexec && !c.entry(0, 9).cloexec);
    assert_eq!(f7.flags & KEEP, WRONLY | NONBLOCK);
    assert_eq!(f9.flags & KEEP, RDONLY);

    // Same file as fd 3, but its own description.
    let f = c.file(0, 10);
    assert_eq!(f.kind, c.file(0, 3).kind);
    assert_ne!(c.entry(0, 10).file, c.entry(0, 3).file);
    assert_eq!((f.pos, f.flags & KEEP), (5, RDWR));

    // The child's pipe still holds every byte.
    let mut r = copy_fd(child.pid, 9);
    assert_eq!(sys::fionread(r.as_fd()).expect("FIONREAD"), 1000);
    let (_, again) = pipe::peek_pipe(r.as_fd()).expect("peek");
    assert_eq!(again, data);
    let mut buf = vec![0u8; 2000];
    let n = r.read(&mut buf).expect("read");
    assert_eq!(&buf[..n], &data[..]);
    // No fd of ours was left behind in the child.
    assert_eq!(fd_list(child.pid), nums);
}

#[test]
fn socket_is_a_unix_socket_but_socket_stdio_is_outside() {
    let null = Act::Open {
        path: cs("/dev/null"),
        flags: libc::O_RDONLY,
        at: 0,
        seek: 0,
        cloexec: false,
    };
    // Above stdio an unconnected unix socket is one of the tree's.
    let child = ScriptChild::spawn(&[null, Act::Socket { at: 3 }]);
    let c = collect(&[child.pid]);
    assert!(
        matches!(c.file(0, 3).kind, FileKind::Unix { .. }),
        "{:?}",
        c.file(0, 3)
    );
    drop(child);

    let child = ScriptChild::spawn(&[Act::Socket { at: 1 }]);
    let ino = std::fs::metadata(format!("/proc/{}/fd/1", child.pid))
        .expect("stat socket")
        .ino();
    let c = collect(&[child.pid]);
    assert_eq!(c.numbers(0), vec![1]);
    assert_eq!(
        c.file(0, 1).kind,
        FileKind::Outside {
            what: format!("socket:[{ino}]")
        }
    );
    assert_eq!(c.file(0, 1).flags & KEEP, RDWR);
    assert!(c.pipes.is_empty());
}

#[test]
fn pipe_with_peer_outside_is_refused() {
    let (r, w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe");
    expect_unsupported(
        &[Act::Keep {
            from: w.as_raw_fd(),
            at: 4,
        }],
        4,
        "other end is outside",
    );
    // One description at fds 1 and 4: fd 1 alone could go outside, fd 4
    // cannot.
    expect_unsupported(
        &[
            Act::Keep {
                from: w.as_raw_fd(),
                at: 1,
            },
            Act::Keep {
                from: w.as_raw_fd(),
                at: 4,
            },
        ],
        4,
        "other end is outside",
    );
    drop((r, w));
}

/// A pipe the tree holds one end of, whose other end nobody holds any
/// more (a supervisor closed its side): collected with its unread data and
/// restored as a pipe whose other end is closed: the data, then end of
/// file; a write end without readers gets EPIPE.
#[test]
fn pipe_whose_other_end_is_closed_comes_back_widowed() {
    let (r, w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe");
    let (r2, w2) = sys::pipe2(libc::O_CLOEXEC).expect("pipe 2");
    std::fs::File::from(w.try_clone().expect("dup"))
        .write_all(b"left behind")
        .expect("write");
    let child = ScriptChild::spawn(&[
        Act::Keep {
            from: r.as_raw_fd(),
            at: 4,
        },
        Act::Keep {
            from: w2.as_raw_fd(),
            at: 5,
        },
    ]);
    // While this test holds the other ends, they are outside the tree.
    assert!(try_collect(&[child.pid]).is_err());
    drop((r, w, r2, w2));
    let c = collect(&[child.pid]);
    assert_eq!(c.pipes.len(), 2, "{:?}", c.pipes);
    let read_end = c.file(0, 4);
    let FileKind::Pipe { pipe, write_end } = read_end.kind else {
        panic!("fd 4: {:?}", read_end.kind);
    };
    assert!(!write_end);
    let obj = c.pipes.iter().find(|p| p.id == pipe).expect("pipe of fd 4");
    assert_eq!(obj.data, b"left behind");
    assert!(matches!(
        c.file(0, 5).kind,
        FileKind::Pipe {
            write_end: true,
            ..
        }
    ));

    let tree = image_of(&[child.pid], &c);
    let dir = TempDir::new("widowed");
    let opened = open_tree(&tree, &policy(&dir));
    let guard = restore_task(&tree, 0, &opened);
    drop(opened);
    let pid = guard.0;
    let mut got = Vec::new();
    copy_fd(pid, 4)
        .read_to_end(&mut got)
        .expect("read to end of file");
    assert_eq!(got, b"left behind");
    let err = copy_fd(pid, 5).write(b"x").expect_err("no reader");
    assert_eq!(err.raw_os_error(), Some(libc::EPIPE), "{err}");
}

#[test]
fn pipe_with_peer_outside_is_outside_at_stdio() {
    // The child's stdin is read from the test, its stdout written to it.
    let (in_r, in_w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe in");
    let (out_r, out_w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe out");
    let child = ScriptChild::spawn(&[
        Act::Keep {
            from: in_r.as_raw_fd(),
            at: 0,
        },
        Act::Keep {
            from: out_w.as_raw_fd(),
            at: 1,
        },
    ]);
    let c = collect(&[child.pid]);
    assert_eq!(c.numbers(0), vec![0, 1]);
    assert_ne!(c.entry(0, 0).file, c.entry(0, 1).file);
    let f0 = c.file(0, 0);
    assert_eq!(
        f0.kind,
        FileKind::Outside {
            what: format!("pipe:[{}]", pipe_ino(&in_r))
        }
    );
    assert_eq!(f0.flags & KEEP, RDONLY);
    let f1 = c.file(0, 1);
    assert_eq!(
        f1.kind,
        FileKind::Outside {
            what: format!("pipe:[{}]", pipe_ino(&out_w))
        }
    );
    assert_eq!(f1.flags & KEEP, WRONLY);
    assert!(c.pipes.is_empty(), "{:?}", c.pipes);
    drop((in_r, in_w, out_r, out_w));
}

/// A file deleted while open travels with its contents: fds sharing a
/// description keep one, another open of the same file gets its own
/// description of the same (recreated, unnamed) inode, positions kept.
#[test]
fn deleted_file_travels_with_its_contents() {
    let dir = TempDir::new("deleted");
    let p = dir.file("gone");
    let content = pattern(10_000);
    std::fs::write(&p, &content).expect("write");
    let acts = [
        Act::Open {
            path: cs(&p),
            flags: libc::O_RDWR,
            at: 3,
            seek: 123,
            cloexec: false,
        },
        Act::Dup {
            from: 3,
            at: 4,
            cloexec: true,
        },
        Act::Open {
            path: cs(&p),
            flags: libc::O_RDONLY,
            at: 5,
            seek: 7,
            cloexec: false,
        },
    ];
    let child = ScriptChild::spawn(&acts);
    std::fs::remove_file(&p).expect("unlink");
    let c = collect(&[child.pid]);
    let fds = &c.fds[0];
    let file_of = |n: i32| fds.iter().find(|e| e.fd == n).expect("fd").file;
    assert_eq!(file_of(3), file_of(4), "dup shares the description");
    assert_ne!(
        file_of(3),
        file_of(5),
        "a second open is its own description"
    );
    assert_eq!(c.deleted.len(), 1, "one deleted inode: {:?}", c.files);
    assert_eq!(c.deleted[0].data, content);
    assert_eq!(c.deleted[0].path, p);
    for f in &c.files {
        assert!(
            matches!(f.kind, FileKind::Deleted { id } if id == c.deleted[0].id),
            "{f:?}"
        );
    }
    let tree = image_of(&[child.pid], &c);
    let d = TempDir::new("deleted-restore");
    let opened = open_tree(&tree, &policy(&d));
    let stub = restore_task(&tree, 0, &opened);
    drop(opened);
    let pid = stub.0;
    assert_eq!(pos(pid, 3), 123);
    assert_eq!(pos(pid, 5), 7);
    assert!(same(pid, 3, pid, 4), "fds 3 and 4 share one description");
    assert!(!same(pid, 3, pid, 5), "fd 5 has its own");
    assert!(link(pid, 3).ends_with("(deleted)"), "{}", link(pid, 3));
    let mut f = copy_fd(pid, 5);
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_end(&mut back).expect("read");
    assert_eq!(back, content, "contents restored");
    // One inode: a write through fd 3 is read through fd 5.
    let mut w = copy_fd(pid, 3);
    w.seek(SeekFrom::Start(0)).expect("seek");
    w.write_all(b"XYZ").expect("write");
    let mut three = [0u8; 3];
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_exact(&mut three).expect("read");
    assert_eq!(&three, b"XYZ");
}

#[test]
fn deleted_files_above_the_limit_are_refused() {
    let dir = TempDir::new("deleted-big");
    let p = dir.file("big");
    std::fs::write(&p, vec![1u8; 5000]).expect("write");
    let acts = [Act::Open {
        path: cs(&p),
        flags: libc::O_RDONLY,
        at: 3,
        seek: 0,
        cloexec: false,
    }];
    let child = ScriptChild::spawn(&acts);
    std::fs::remove_file(&p).expect("unlink");
    let r = frozen(&[child.pid], || {
        let mut files = FileCollector::with_deleted_limit(4096);
        files.task(child.pid, &mut ShmemCollector::new())
    });
    match r {
        Err(Error::UnsupportedFd { pid, fd: 3, kind }) => {
            assert_eq!(pid, child.pid);
            assert!(
                kind.contains("a deleted file")
                    && kind.contains("4096")
                    && kind.contains("--max-deleted-mib"),
                "{kind}"
            )
        }
        other => panic!("expected a refusal above the limit, got {other:?}"),
    }
}

#[test]
fn missing_process() {
    let pid = i32::MAX - 1;
    match FileCollector::new().task(pid, &mut ShmemCollector::new()) {
        Err(Error::NoSuchProcess { pid: p }) => assert_eq!(p, pid),
        other => panic!("expected NoSuchProcess, got {other:?}"),
    }
}

// ----------------------------------------------------------- restore side

#[test]
fn install_files_devices_dirs_and_pipe() {
    let dir = TempDir::new("restore");
    std::fs::write(dir.file("a"), vec![b'x'; 5000]).expect("write a");
    std::fs::write(dir.file("b"), b"hello").expect("write b");
    let null_rdev = std::fs::metadata("/dev/null").expect("null").rdev();
    let data = pattern(1000);
    // File ids in no particular order: fds find theirs by id.
    let files = vec![
        open_file(
            7,
            libc::O_RDWR,
            0,
            FileKind::CharDevice {
                path: "/dev/null".into(),
                rdev: null_rdev,
            },
        ),
        open_file(3, libc::O_RDONLY, 1234, regular(&dir.file("a"))),
        open_file(
            9,
            libc::O_WRONLY | libc::O_APPEND,
            0,
            regular(&dir.file("b")),
        ),
        open_file(
            1,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
            FileKind::Directory {
                path: dir.path.to_string_lossy().into_owned(),
            },
        ),
        open_file(
            5,
            libc::O_RDONLY,
            0,
            FileKind::Pipe {
                pipe: 42,
                write_end: false,
            },
        ),
        open_file(
            2,
            libc::O_WRONLY | libc::O_NONBLOCK,
            0,
            FileKind::Pipe {
                pipe: 42,
                write_end: true,
            },
        ),
    ];
    let fds = vec![
        fd(0, false, 7),
        fd(3, true, 3),
        fd(4, false, 9),
        fd(6, true, 1),
        fd(8, false, 5),
        fd(12, true, 2),
    ];
    let pipes = vec![PipeObject {
        id: 42,
        capacity: 131072,
        data: data.clone(),
    }];
    let tree = image(vec![process(4242, fds)], files, pipes);
    let opened = open_tree(&tree, &policy(&dir));
    assert_eq!(opened.stdio_log, None);
    let guard = restore_task(&tree, 0, &opened);
    drop(opened);
    let pid = guard.0;
    assert_eq!(fd_list(pid), vec![0, 3, 4, 6, 8, 12]);
    assert_eq!(link(pid, 0), "/dev/null");
    assert_eq!(link(pid, 3), dir.file("a"));
    assert_eq!(link(pid, 4), dir.file("b"));
    assert_eq!(link(pid, 6), dir.path.to_string_lossy());
    assert!(link(pid, 8).starts_with("pipe:["));
    assert_eq!(link(pid, 8), link(pid, 12));

    assert_eq!(fdinfo(pid, 0).0 & KEEP, RDWR);
    assert_eq!(fdinfo(pid, 3), (LARGEFILE | CLOEXEC, 1234));
    let (f4, p4) = fdinfo(pid, 4);
    assert_eq!((f4 & KEEP, p4), (WRONLY | APPEND, 0));
    let f6 = fdinfo(pid, 6).0;
    assert_eq!(f6 & CLOEXEC, CLOEXEC);
    assert_ne!(f6 & libc::O_DIRECTORY as u32, 0);
    assert_eq!(fdinfo(pid, 8).0 & KEEP, RDONLY);
    assert_eq!(fdinfo(pid, 12).0 & KEEP, WRONLY | NONBLOCK | CLOEXEC);
    // Independent descriptions stay independent.
    assert!(!same(pid, 3, pid, 4) && !same(pid, 8, pid, 12));

    // Capacity and data arrived intact.
    let r = copy_fd(pid, 8);
    assert_eq!(
        sys::fcntl(r.as_fd(), libc::F_GETPIPE_SZ, 0).expect("size"),
        131072
    );
    drop(r);
    assert_eq!(drain_pipe(pid, 8), data);
    // The agent kept no copies: only the stub holds the pipe now, so
    // writing into it and reading back proves the ends are joined.
    copy_fd(pid, 12).write_all(b"more").expect("write");
    assert_eq!(drain_pipe(pid, 8), b"more");
}

#[test]
fn replaced_file_is_incompatible() {
    let dir = TempDir::new("replaced");
    let a = dir.file("a");
    std::fs::write(&a, b"x").expect("write");
    let files = vec![open_file(1, libc::O_RDONLY, 0, regular(&a))];
    let tree = image(vec![process(4242, vec![fd(3, false, 1)])], files, vec![]);
    // A new inode takes its name (created first, so its number differs).
    std::fs::write(dir.file("a.new"), b"y").expect("write new");
    std::fs::rename(dir.file("a.new"), &a).expect("rename");
    let (guard, r) = with_stub(true, |_, inj| {
        Opened::open_all(&tree, &ShmemHandles::default(), &policy(&dir))
            .and_then(|o| install(inj, &tree.tasks[0].fds, &o))
    });
    match r {
        Err(Error::Incompatible(msg)) => {
            assert!(msg.contains(&a) && msg.contains("fd 3"), "{msg}")
        }
        other => panic!("expected Incompatible, got {other:?}"),
    }
    // Nothing was left in the stub.
    assert_eq!(fd_list(guard.0), Vec::<i32>::new());
}

#[test]
fn pipe_data_over_capacity_is_refused() {
    let files = vec![open_file(
        1,
        libc::O_RDONLY,
        0,
        FileKind::Pipe {
            pipe: 1,
            write_end: false,
        },
    )];
    let pipes = vec![PipeObject {
        id: 1,
        capacity: 4096,
        data: vec![0u8; 5000],
    }];
    let tree = image(vec![process(4242, vec![fd(3, false, 1)])], files, pipes);
    let dir = TempDir::new("overfull");
    match Opened::open_all(&tree, &ShmemHandles::default(), &policy(&dir)) {
        Err(Error::Incompatible(msg)) => {
            assert!(msg.contains("fd 3") && msg.contains("5000"), "{msg}")
        }
        Err(other) => panic!("expected Incompatible, got {other:?}"),
        Ok(_) => panic!("a pipe over its capacity was opened"),
    }
}

#[test]
fn round_trip_from_child_to_stub() {
    let dir = TempDir::new("roundtrip");
    let (acts, data) = scene(&dir);
    let child = ScriptChild::spawn(&acts);
    let before = collect(&[child.pid]);
    let tree = image_of(&[child.pid], &before);
    let opened = open_tree(&tree, &policy(&dir));
    let guard = restore_task(&tree, 0, &opened);
    drop(opened);
    let pid = guard.0;
    // Collect again from the stub.
    let after = collect(&[pid]);

    assert_eq!(fd_list(pid), fd_list(child.pid));
    for fd in fd_list(child.pid) {
        assert_eq!(fdinfo(pid, fd), fdinfo(child.pid, fd), "fdinfo of fd {fd}");
        let (l1, l2) = (link(child.pid, fd), link(pid, fd));
        if l1.starts_with("pipe:[") {
            assert!(l2.starts_with("pipe:["), "fd {fd}: {l2}");
        } else {
            assert_eq!(l1, l2, "fd {fd}");
        }
    }
    // The same image, except for the pipe's id (a new pipe).
    assert_eq!(after.fds, before.fds);
    assert_eq!(after.without_pipe_ids(), before.without_pipe_ids());
    assert_ne!(link(pid, 9), link(child.pid, 9), "a new pipe");
    assert_eq!(drain_pipe(pid, 9), data);
}

// --------------------------------------------------- what the tree brings

#[test]
fn dup_and_shared_descriptions_are_one_file() {
    let dir = TempDir::new("shared");
    let a = dir.file("a");
    std::fs::write(&a, vec![b'a'; 10_000]).expect("write a");
    // The description both children share, opened by the test at 100.
    let mut shared = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a)
        .expect("open a");
    shared.seek(SeekFrom::Start(100)).expect("seek");
    // Child 1: the shared description at 3 and (dup) 4; a description of
    // its own on the same file, same flags and offset, at 5 and (dup) 6.
    let c1 = ScriptChild::spawn(&[
        Act::Keep {
            from: shared.as_raw_fd(),
            at: 3,
        },
        Act::Dup {
            from: 3,
            at: 4,
            cloexec: true,
        },
        Act::Open {
            path: cs(&a),
            flags: libc::O_RDWR,
            at: 5,
            seek: 100,
            cloexec: false,
        },
        Act::Dup {
            from: 5,
            at: 6,
            cloexec: false,
        },
    ]);
    // Child 2: a description of its own at 3, the shared one at 7.
    let c2 = ScriptChild::spawn(&[
        Act::Open {
            path: cs(&a),
            flags: libc::O_RDWR,
            at: 3,
            seek: 100,
            cloexec: false,
        },
        Act::Keep {
            from: shared.as_raw_fd(),
            at: 7,
        },
    ]);
    drop(shared);
    let pids = [c1.pid, c2.pid];
    let c = collect(&pids);
    assert_eq!((c.numbers(0), c.numbers(1)), (vec![3, 4, 5, 6], vec![3, 7]));

    let shared_id = c.entry(0, 3).file;
    let own1 = c.entry(0, 5).file;
    let own2 = c.entry(1, 3).file;
    assert_eq!(c.entry(0, 4).file, shared_id, "dup in one process");
    assert_eq!(c.entry(1, 7).file, shared_id, "shared across processes");
    assert_eq!(c.entry(0, 6).file, own1, "dup of the child's own");
    assert!(
        shared_id != own1 && shared_id != own2 && own1 != own2,
        "{:?}",
        c.fds
    );
    // Three descriptions that differ in nothing but their identity.
    assert_eq!(c.files.len(), 3, "{:?}", c.files);
    for f in &c.files {
        assert_eq!((f.pos, f.flags & KEEP, &f.kind), (100, RDWR, &regular(&a)));
    }
    // Close-on-exec belongs to the fd, not to the description.
    assert!(!c.entry(0, 3).cloexec && c.entry(0, 4).cloexec);

    // Restore both into two stubs from one agent side.
    let tree = image_of(&pids, &c);
    let opened = open_tree(&tree, &policy(&dir));
    let g1 = restore_task(&tree, 0, &opened);
    let g2 = restore_task(&tree, 1, &opened);
    drop(opened);
    let (s1, s2) = (g1.0, g2.0);
    assert_eq!((fd_list(s1), fd_list(s2)), (vec![3, 4, 5, 6], vec![3, 7]));
    assert_eq!(fdinfo(s1, 3).0 & CLOEXEC, 0);
    assert_eq!(fdinfo(s1, 4).0 & CLOEXEC, CLOEXEC);
    // The collector sees the same tree in the stubs.
    let again = collect(&[s1, s2]);
    assert_eq!(again.fds, c.fds);
    assert_eq!(again.files, c.files);

    assert!(same(s1, 3, s1, 4) && same(s1, 3, s2, 7) && same(s1, 5, s1, 6));
    assert!(!same(s1, 3, s1, 5) && !same(s1, 3, s2, 3) && !same(s1, 5, s2, 3));
    // A write through the shared description moves every fd of it, in
    // both processes, and no other.
    copy_fd(s1, 3).write_all(b"xyz").expect("write");
    assert_eq!((pos(s1, 3), pos(s1, 4), pos(s2, 7)), (103, 103, 103));
    assert_eq!((pos(s1, 5), pos(s1, 6), pos(s2, 3)), (100, 100, 100));
    // A seek in the other process is seen in the first.
    copy_fd(s2, 7).seek(SeekFrom::Start(4000)).expect("seek");
    assert_eq!((pos(s1, 3), pos(s1, 4), pos(s2, 7)), (4000, 4000, 4000));
    // The child's own description is shared by its dup only.
    copy_fd(s1, 6).seek(SeekFrom::Start(50)).expect("seek");
    assert_eq!((pos(s1, 5), pos(s1, 6), pos(s2, 3)), (50, 50, 100));
    // Status flags are shared too.
    let w = copy_fd(s2, 7);
    let fl = sys::fcntl(w.as_fd(), libc::F_GETFL, 0).expect("F_GETFL");
    sys::fcntl(w.as_fd(), libc::F_SETFL, fl | libc::O_APPEND).expect("F_SETFL");
    assert_eq!(fdinfo(s1, 4).0 & APPEND, APPEND);
    assert_eq!(fdinfo(s1, 5).0 & APPEND, 0);
    let text = std::fs::read(&a).expect("read a");
    assert_eq!(&text[100..103], b"xyz");
}

#[test]
fn pipe_across_two_processes_is_one_pipe() {
    let data = pattern(3000);
    let (r, w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe");
    let mut w = std::fs::File::from(w);
    w.write_all(&data).expect("fill");
    let c1 = ScriptChild::spawn(&[Act::Keep {
        from: r.as_raw_fd(),
        at: 3,
    }]);
    let c2 = ScriptChild::spawn(&[Act::Keep {
        from: w.as_raw_fd(),
        at: 4,
    }]);
    drop((r, w));
    let pids = [c1.pid, c2.pid];
    let c = collect(&pids);
    assert_eq!((c.numbers(0), c.numbers(1)), (vec![3], vec![4]));
    let (fr, fw) = (c.file(0, 3), c.file(1, 4));
    let FileKind::Pipe {
        pipe,
        write_end: false,
    } = fr.kind
    else {
        panic!("fd 3 of child 1 is not a read end: {fr:?}")
    };
    assert_eq!(
        fw.kind,
        FileKind::Pipe {
            pipe,
            write_end: true
        }
    );
    assert_eq!((fr.flags & KEEP, fw.flags & KEEP), (RDONLY, WRONLY));
    assert_eq!(
        c.pipes,
        vec![PipeObject {
            id: pipe,
            capacity: 65536,
            data: data.clone()
        }]
    );

    let dir = TempDir::new("pipe2");
    let tree = image_of(&pids, &c);
    let opened = open_tree(&tree, &policy(&dir));
    assert_eq!(opened.stdio_log, None);
    let g1 = restore_task(&tree, 0, &opened);
    let g2 = restore_task(&tree, 1, &opened);
    drop(opened);
    let (s1, s2) = (g1.0, g2.0);
    assert!(link(s1, 3).starts_with("pipe:["));
    assert_eq!(link(s1, 3), link(s2, 4));
    let again = collect(&[s1, s2]);
    assert_eq!(again.fds, c.fds);
    assert_eq!(again.without_pipe_ids(), c.without_pipe_ids());
    assert_eq!(drain_pipe(s1, 3), data);
    // Only the stubs hold the pipe: what one writes the other reads.
    copy_fd(s2, 4).write_all(b"more").expect("write");
    assert_eq!(drain_pipe(s1, 3), b"more");
    // The original children's pipe still holds every byte.
    assert_eq!(drain_pipe(c1.pid, 3), data);
}

#[test]
fn outside_stdio_reads_dev_null_and_appends_to_the_log() {
    let (in_r, in_w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe in");
    let (out_r, out_w) = sys::pipe2(libc::O_CLOEXEC).expect("pipe out");
    // stdout and stderr: one description (as after 2>&1).
    let child = ScriptChild::spawn(&[
        Act::Keep {
            from: in_r.as_raw_fd(),
            at: 0,
        },
        Act::Keep {
            from: out_w.as_raw_fd(),
            at: 1,
        },
        Act::Keep {
            from: out_w.as_raw_fd(),
            at: 2,
        },
    ]);
    let c = collect(&[child.pid]);
    assert_eq!(c.numbers(0), vec![0, 1, 2]);
    assert_eq!(c.entry(0, 1).file, c.entry(0, 2).file);
    assert_ne!(c.entry(0, 0).file, c.entry(0, 1).file);
    assert_eq!(c.files.len(), 2);
    assert!(matches!(c.file(0, 0).kind, FileKind::Outside { .. }));
    assert!(matches!(c.file(0, 1).kind, FileKind::Outside { .. }));
    assert!(c.pipes.is_empty());
    drop((in_r, in_w, out_r, out_w));

    let dir = TempDir::new("stdio");
    let stdio = policy(&dir);
    let tree = image_of(&[child.pid], &c);
    let opened = open_tree(&tree, &stdio);
    assert_eq!(opened.stdio_log.as_ref(), Some(&stdio.log));
    let guard = restore_task(&tree, 0, &opened);
    drop(opened);
    let pid = guard.0;
    let log = stdio.log.to_string_lossy().into_owned();
    assert_eq!(fd_list(pid), vec![0, 1, 2]);
    assert_eq!(
        std::fs::metadata(&stdio.log)
            .expect("log")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // stdin reads end of file from /dev/null.
    assert_eq!(link(pid, 0), "/dev/null");
    assert_eq!(fdinfo(pid, 0).0 & KEEP, RDONLY);
    let mut buf = [0u8; 16];
    assert_eq!(copy_fd(pid, 0).read(&mut buf).expect("read stdin"), 0);

    // stdout and stderr append to the log through one description.
    assert_eq!((link(pid, 1), link(pid, 2)), (log.clone(), log.clone()));
    assert_eq!(fdinfo(pid, 1).0 & KEEP, WRONLY | APPEND);
    assert!(same(pid, 1, pid, 2) && !same(pid, 0, pid, 1));
    // Someone else writes to the log first: appends go after it.
    std::fs::write(&stdio.log, b"before\n").expect("write log");
    copy_fd(pid, 1).write_all(b"hello ").expect("write stdout");
    copy_fd(pid, 2).write_all(b"world").expect("write stderr");
    assert_eq!(
        std::fs::read(&stdio.log).expect("read log"),
        b"before\nhello world"
    );
    // One offset: both at the end after the last write.
    assert_eq!((pos(pid, 1), pos(pid, 2)), (18, 18));
}

#[test]
fn separate_outside_descriptions_get_separate_log_descriptions() {
    let child = ScriptChild::spawn(&[Act::Socket { at: 1 }, Act::Socket { at: 2 }]);
    let c = collect(&[child.pid]);
    assert_ne!(c.entry(0, 1).file, c.entry(0, 2).file);
    for fd in [1, 2] {
        let FileKind::Outside { what } = &c.file(0, fd).kind else {
            panic!("fd {fd} is not outside: {:?}", c.file(0, fd))
        };
        assert!(what.starts_with("socket:["), "{what}");
    }
    let dir = TempDir::new("stdio2");
    let stdio = policy(&dir);
    let tree = image_of(&[child.pid], &c);
    let opened = open_tree(&tree, &stdio);
    let guard = restore_task(&tree, 0, &opened);
    drop(opened);
    let pid = guard.0;
    let log = stdio.log.to_string_lossy().into_owned();
    assert_eq!((link(pid, 1), link(pid, 2)), (log.clone(), log));
    assert!(!same(pid, 1, pid, 2));
    copy_fd(pid, 1).write_all(b"one ").expect("write 1");
    copy_fd(pid, 2).write_all(b"two").expect("write 2");
    // Both append (neither overwrote the other), each at its own offset.
    assert_eq!(std::fs::read(&stdio.log).expect("read log"), b"one two");
    assert_eq!((pos(pid, 1), pos(pid, 2)), (4, 7));

    // A tree whose only outside stdio is read from needs no log.
    let files = vec![open_file(
        1,
        libc::O_RDONLY,
        0,
        FileKind::Outside {
            what: "pipe:[1]".into(),
        },
    )];
    let dir = TempDir::new("stdio3");
    let stdio = policy(&dir);
    let tree = image(vec![process(4242, vec![fd(0, false, 1)])], files, vec![]);
    let opened = open_tree(&tree, &stdio);
    assert_eq!(opened.stdio_log, None);
    assert!(!stdio.log.exists() && !dir.path.join("logs").exists());
}
