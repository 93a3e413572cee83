//! Tests of the memfd, POSIX and SysV kinds on real processes and the real
//! kernel: a forked child holds the object (it inherits this process's
//! mappings and fds, which the test then drops), the collector recognises
//! and dumps it, the handles recreate and fill it. Every object made is
//! removed by a guard, also when a test fails; children are killed and
//! reaped by PID.

use super::*;
use crate::procfs;
use crate::testutil::StubGuard;
use ferry_protocol::model::HostInfo;
use ferry_protocol::pages::PageRun;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

const PAGE: usize = PAGE_SIZE as usize;

/// SysV tests choose ids through the one `kernel.shm_next_id`: one at a
/// time.
static SYSV_LOCK: Mutex<()> = Mutex::new(());

fn sysv_lock() -> std::sync::MutexGuard<'static, ()> {
    SYSV_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A unique name for this test process.
fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "ferry-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `len` bytes: page `i` is filled with a pattern seeded by `i` if `i` is in
/// `pages`, zero otherwise.
fn pattern(len: usize, pages: &[usize]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for &p in pages {
        let end = ((p + 1) * PAGE).min(len);
        for (i, b) in v[p * PAGE..end].iter_mut().enumerate() {
            *b = (i * 31 + p * 7 + 1) as u8 | 1;
        }
    }
    v
}

/// Pages collected by offset.
#[derive(Default)]
struct Pages(BTreeMap<u64, Vec<u8>>);

impl PageSink for Pages {
    fn add(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        assert_eq!(data.len() % PAGE, 0, "whole pages only");
        for (i, p) in data.chunks(PAGE).enumerate() {
            self.0.insert(addr + (i * PAGE) as u64, p.to_vec());
        }
        Ok(())
    }
}

impl Pages {
    /// The first `len` bytes of the object, holes read as zero.
    fn image(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len.next_multiple_of(PAGE)];
        for (a, p) in &self.0 {
            let a = *a as usize;
            v[a..a + PAGE].copy_from_slice(p);
        }
        v.truncate(len);
        v
    }

    /// A batch as restore reads it: one run per page, zero pages as markers.
    fn batch(&self) -> PageBatch {
        let mut b = PageBatch::default();
        for (a, p) in &self.0 {
            let zero = p.iter().all(|&x| x == 0);
            b.runs.push(PageRun {
                addr: *a,
                pages: 1,
                zero,
            });
            if !zero {
                b.data.extend_from_slice(p);
            }
        }
        b
    }
}

/// A tree that holds only `obj`.
fn tree_with(obj: ShmemObject) -> TreeImage {
    TreeImage {
        host: HostInfo {
            arch: "x86_64".into(),
            kernel: String::new(),
            xstate_size: 0,
            xfeatures: 0,
        },
        tasks: vec![],
        zombies: vec![],
        files: vec![],
        pipes: vec![],
        shmem: vec![obj],
        deleted: vec![],
        locks: vec![],
    }
}

/// Fork a child that inherits all our mappings and fds and waits in
/// `pause()`; returns once it is there.
fn fork_paused() -> StubGuard {
    let pid = fork_pause();
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let g = StubGuard(pid);
    for _ in 0..5000 {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if sc.starts_with(&format!("{} ", libc::SYS_pause)) {
            return g;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("child {pid} did not reach pause()");
}

fn fork_pause() -> i32 {
    // SAFETY: the child only makes raw pause system calls (no allocation,
    // no locks) until it is killed.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
        pid
    }
}

/// The maps entry of `pid` whose path starts with `prefix`.
fn entry(pid: i32, prefix: &str) -> MapsEntry {
    procfs::maps(pid)
        .expect("maps")
        .into_iter()
        .find(|m| m.path.as_deref().is_some_and(|p| p.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no mapping of {prefix} in process {pid}"))
}

fn memfd(name: &str, flags: libc::c_uint) -> OwnedFd {
    let c = CString::new(name).expect("name");
    // SAFETY: a valid C string; the new fd is wrapped once.
    unsafe {
        let r = libc::memfd_create(c.as_ptr(), flags);
        assert!(r >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(r)
    }
}

fn truncate(fd: BorrowedFd<'_>, len: u64) {
    memfd::ftruncate(fd, len).expect("ftruncate");
}

fn seals(fd: BorrowedFd<'_>) -> u32 {
    sys::fcntl(fd, libc::F_GET_SEALS, 0).expect("F_GET_SEALS") as u32
}

fn add_seals_raw(fd: BorrowedFd<'_>, s: i32) {
    sys::fcntl(fd, libc::F_ADD_SEALS, s).expect("F_ADD_SEALS");
}

fn rw() -> libc::c_int {
    libc::PROT_READ | libc::PROT_WRITE
}

/// Map `fd` shared and write the pages of `data` that are not zero (the
/// others stay holes).
fn map_write(fd: BorrowedFd<'_>, data: &[u8]) -> Mapping {
    let len = (data.len() as u64).next_multiple_of(PAGE_SIZE);
    let mut m = Mapping::new(fd, len, rw()).expect("mmap");
    write_pages(&mut m, data);
    m
}

/// Write the pages of `data` that are not zero into `m`.
fn write_pages(m: &mut Mapping, data: &[u8]) {
    for (i, p) in data.chunks(PAGE).enumerate() {
        if p.iter().any(|&b| b != 0) {
            m.write((i * PAGE) as u64, p).expect("write");
        }
    }
}

/// The handle of object `id` (its private fields are what restore uses).
fn handle(h: &ShmemHandles, id: ShmemId) -> &Handle {
    h.get(id).expect("handle")
}

/// Read back object `id` through the path a target would open.
fn read_back(h: &ShmemHandles, id: ShmemId) -> Vec<u8> {
    match h.map_source(id).expect("map source") {
        MapSource::Path(p) => std::fs::read(&p).expect("read back"),
        MapSource::SysV(s) => panic!("segment {s} has no path"),
    }
}

fn the_one(c: &ShmemCollector) -> ShmemObject {
    let objs = c.objects();
    assert_eq!(objs.len(), 1, "{objs:?}");
    objs[0].clone()
}

// ---------------------------------------------------------------- memfd

#[test]
fn shmem_memfd_mapping_and_fd_round_trip() {
    let name = unique("memfd");
    let size = 3 * PAGE + 100;
    let data = pattern(size, &[0, 2, 3]);
    let fd = memfd(&name, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
    truncate(fd.as_fd(), size as u64);
    let map = map_write(fd.as_fd(), &data);
    add_seals_raw(fd.as_fd(), libc::F_SEAL_GROW | libc::F_SEAL_SHRINK);
    // The child inherits the mapping and the fd (same number).
    let child = fork_paused();
    let raw = fd.as_raw_fd();
    drop(map);
    drop(fd);
    let pid = child.0;

    let mut c = ShmemCollector::new();
    let m = entry(pid, &format!("/memfd:{name}"));
    let (id, off) = c
        .vma_object(pid, &m)
        .expect("vma_object")
        .expect("an object");
    assert_eq!(off, 0);
    let obj = the_one(&c);
    let want_seals = (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) as u32;
    assert_eq!(
        obj.kind,
        ShmemKind::Memfd {
            name: name.clone(),
            seals: want_seals
        }
    );
    assert_eq!(obj.size, size as u64);
    // The fd is the same object.
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{raw}")).expect("readlink");
    let link = link.to_string_lossy().into_owned();
    assert_eq!(link, format!("/memfd:{name} (deleted)"));
    let md = std::fs::metadata(format!("/proc/{pid}/fd/{raw}")).expect("stat fd");
    assert_eq!(
        c.fd_object(pid, raw, &link, &md).expect("fd_object"),
        Some(id)
    );
    assert_eq!(c.objects().len(), 1);

    let mut pages = Pages::default();
    c.dump_contents(id, &mut pages).expect("dump");
    assert_eq!(pages.image(size), data);
    assert!(!pages.0.contains_key(&(PAGE as u64)), "a hole was dumped");
    drop(child);

    let mut h = ShmemHandles::create(&tree_with(obj.clone())).expect("create");
    h.fill(id, &pages.batch()).expect("fill");
    assert_eq!(read_back(&h, id), data);
    let fd_path = match h.map_source(id).expect("source") {
        MapSource::Path(p) => p,
        other => panic!("{other:?}"),
    };
    let link = std::fs::read_link(&fd_path).expect("readlink");
    assert_eq!(link.to_string_lossy(), format!("/memfd:{name} (deleted)"));
    let agent_fd = handle(&h, id).fd.as_ref().expect("fd").as_fd();
    assert_eq!(seals(agent_fd), 0, "seals wait for finish");
    // The new memfd is recognised as the same kind, by its fd.
    let me = std::process::id() as i32;
    let md = std::fs::metadata(&fd_path).expect("stat");
    let mut c2 = ShmemCollector::new();
    c2.fd_object(me, agent_fd.as_raw_fd(), &link.to_string_lossy(), &md)
        .expect("fd_object")
        .expect("object");
    assert_eq!(
        c2.objects()[0].kind,
        ShmemKind::Memfd {
            name: name.clone(),
            seals: 0
        }
    );
    // A target maps it writable (the original mapping was), then finish.
    let target = {
        let f =
            sys::open(&crate::files::cpath(&fd_path).expect("path"), libc::O_RDWR).expect("open");
        Mapping::new(f.as_fd(), size.next_multiple_of(PAGE) as u64, rw()).expect("mmap")
    };
    h.finish().expect("finish");
    h.commit();
    let agent_fd = handle(&h, id).fd.as_ref().expect("fd").as_fd();
    assert_eq!(seals(agent_fd), want_seals);
    assert_eq!(target.slice(0, size as u64), &data[..]);
}

#[test]
fn shmem_memfd_write_seal_restores_with_read_only_mappings() {
    let name = unique("memfd-ro");
    let size = 2 * PAGE;
    let data = pattern(size, &[0, 1]);
    let fd = memfd(&name, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
    truncate(fd.as_fd(), size as u64);
    drop(map_write(fd.as_fd(), &data));
    add_seals_raw(
        fd.as_fd(),
        libc::F_SEAL_WRITE | libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK,
    );
    // Sealed: only a read-only shared mapping is possible now.
    let ro = Mapping::new(fd.as_fd(), size as u64, libc::PROT_READ).expect("mmap ro");
    let child = fork_paused();
    drop(ro);
    drop(fd);
    let pid = child.0;
    let mut c = ShmemCollector::new();
    let m = entry(pid, &format!("/memfd:{name}"));
    assert!(!m.write);
    let (id, _) = c.vma_object(pid, &m).expect("vma_object").expect("object");
    let obj = the_one(&c);
    let want = (libc::F_SEAL_WRITE | libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK) as u32;
    assert_eq!(obj.kind, ShmemKind::Memfd { name, seals: want });
    let mut pages = Pages::default();
    c.dump_contents(id, &mut pages).expect("dump");
    drop(child);
    assert_eq!(pages.image(size), data);

    // As map_areas does for a mapping without PROT_WRITE: open O_RDONLY.
    let tree = tree_with(obj);
    let mut h = ShmemHandles::create(&tree).expect("create");
    h.fill(id, &pages.batch()).expect("fill");
    let MapSource::Path(p) = h.map_source(id).expect("source") else {
        panic!("not a path")
    };
    let f = sys::open(&crate::files::cpath(&p).expect("path"), libc::O_RDONLY).expect("open");
    let target = Mapping::new(f.as_fd(), size as u64, libc::PROT_READ).expect("mmap");
    h.finish().expect("finish with read-only mappings");
    assert_eq!(seals(handle(&h, id).fd.as_ref().expect("fd").as_fd()), want);
    assert_eq!(target.slice(0, size as u64), &data[..]);

    // A writable shared mapping makes F_SEAL_WRITE fail, clearly.
    let mut h = ShmemHandles::create(&tree).expect("create");
    let MapSource::Path(p) = h.map_source(id).expect("source") else {
        panic!("not a path")
    };
    let f = sys::open(&crate::files::cpath(&p).expect("path"), libc::O_RDWR).expect("open");
    let _w = Mapping::new(f.as_fd(), size as u64, rw()).expect("mmap");
    let e = h
        .finish()
        .expect_err("F_SEAL_WRITE over a writable mapping");
    assert!(e.to_string().contains("F_SEAL_WRITE"), "{e}");
}

#[test]
fn shmem_memfd_unsealable_and_private() {
    let name = unique("memfd-nos");
    let fd = memfd(&name, libc::MFD_CLOEXEC);
    truncate(fd.as_fd(), PAGE as u64);
    let shared = Mapping::new(fd.as_fd(), PAGE_SIZE, rw()).expect("mmap");
    let me = std::process::id() as i32;
    let mut c = ShmemCollector::new();
    let m = entry(me, &format!("/memfd:{name}"));
    let (id, _) = c.vma_object(me, &m).expect("vma_object").expect("object");
    let obj = the_one(&c);
    assert_eq!(
        obj.kind,
        ShmemKind::Memfd {
            name: name.clone(),
            seals: libc::F_SEAL_SEAL as u32
        }
    );
    let mut h = ShmemHandles::create(&tree_with(obj)).expect("create");
    h.finish().expect("finish");
    h.commit();
    let f = handle(&h, id).fd.as_ref().expect("fd").as_fd();
    assert_eq!(seals(f), libc::F_SEAL_SEAL as u32);
    assert!(sys::fcntl(f, libc::F_ADD_SEALS, libc::F_SEAL_GROW).is_err());
    drop(shared);

    // A private mapping of a memfd is refused, naming it.
    let p = private_map(fd.as_fd());
    let m = entry(me, &format!("/memfd:{name}"));
    assert!(!m.shared);
    let e = ShmemCollector::new()
        .vma_object(me, &m)
        .expect_err("private memfd mapping");
    drop(p);
    let s = e.to_string();
    assert!(s.contains("private") && s.contains(&name), "{s}");
}

fn private_map(fd: BorrowedFd<'_>) -> Mapping {
    // SAFETY: a fresh mapping chosen by the kernel, adopted once.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            fd.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        Mapping::adopt(p.cast(), PAGE_SIZE)
    }
}

// ---------------------------------------------------------------- POSIX

/// A `/dev/shm` file removed on drop.
struct ShmFile(String);

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn create_file(path: &str, mode: u32) -> OwnedFd {
    let c = CString::new(path).expect("path");
    let fd = sys::open_mode(&c, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
        .expect("create /dev/shm file");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
    fd
}

fn posix_obj(c: &ShmemCollector) -> (ShmemObject, String, bool) {
    let obj = the_one(c);
    match &obj.kind {
        ShmemKind::Posix { path, deleted, .. } => {
            let (p, d) = (path.clone(), *deleted);
            (obj, p, d)
        }
        k => panic!("not POSIX: {k:?}"),
    }
}

#[test]
fn shmem_posix_named_round_trip() {
    let path = format!("/dev/shm/{}", unique("posix"));
    let _g = ShmFile(path.clone());
    let size = 5 * PAGE;
    let data = pattern(size, &[1, 3]);
    let fd = create_file(&path, 0o640);
    truncate(fd.as_fd(), size as u64);
    let map = map_write(fd.as_fd(), &data);
    let child = fork_paused();
    let raw = fd.as_raw_fd();
    drop(map);
    drop(fd);
    let pid = child.0;

    let mut c = ShmemCollector::new();
    let m = entry(pid, &path);
    let (id, _) = c.vma_object(pid, &m).expect("vma_object").expect("object");
    let (obj, p, deleted) = posix_obj(&c);
    assert_eq!((p.as_str(), deleted), (path.as_str(), false));
    assert_eq!(
        obj.kind,
        ShmemKind::Posix {
            path: path.clone(),
            mode: 0o640,
            uid: 0,
            gid: 0,
            deleted: false
        }
    );
    assert_eq!(obj.size, size as u64);
    let fdp = format!("/proc/{pid}/fd/{raw}");
    let link = std::fs::read_link(&fdp).expect("readlink");
    let md = std::fs::metadata(&fdp).expect("stat");
    assert_eq!(
        c.fd_object(pid, raw, &link.to_string_lossy(), &md)
            .expect("fd_object"),
        Some(id)
    );
    let mut pages = Pages::default();
    c.dump_contents(id, &mut pages).expect("dump");
    drop(child);
    assert_eq!(pages.image(size), data);
    assert_eq!(pages.0.len(), 2, "only the written pages");
    let tree = tree_with(obj);

    // Another host: the file is not there. Made, and removed again when
    // the restore does not finish.
    std::fs::remove_file(&path).expect("rm");
    {
        let mut h = ShmemHandles::create(&tree).expect("create");
        assert_eq!(handle(&h, id).undo, Undo::Unlink(path.clone()));
        h.fill(id, &pages.batch()).expect("fill");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }
    assert!(std::fs::metadata(&path).is_err(), "undo left {path}");
    let mut h = ShmemHandles::create(&tree).expect("create");
    h.fill(id, &pages.batch()).expect("fill");
    h.finish().expect("finish");
    h.commit();
    drop(h);
    assert_eq!(std::fs::read(&path).expect("read"), data);
    let md = std::fs::metadata(&path).expect("stat");
    assert_eq!(md.mode() & 0o7777, 0o640);

    // The same host: the file is there with other bytes; reused, emptied,
    // filled, and left in place by an unfinished restore.
    std::fs::write(&path, vec![0xeeu8; 7 * PAGE]).expect("scribble");
    {
        let mut h = ShmemHandles::create(&tree).expect("create");
        assert_eq!(handle(&h, id).undo, Undo::Nothing);
        h.fill(id, &pages.batch()).expect("fill");
        assert_eq!(read_back(&h, id), data);
    }
    assert_eq!(std::fs::read(&path).expect("still there"), data);
}

#[test]
fn shmem_posix_deleted_round_trip() {
    let path = format!("/dev/shm/{}", unique("sem.posix"));
    let _g = ShmFile(path.clone());
    let size = 2 * PAGE + 8;
    let data = pattern(size, &[0, 2]);
    let fd = create_file(&path, 0o600);
    truncate(fd.as_fd(), size as u64);
    let map = map_write(fd.as_fd(), &data);
    std::fs::remove_file(&path).expect("unlink");
    let child = fork_paused();
    drop(map);
    drop(fd);
    let pid = child.0;

    let mut c = ShmemCollector::new();
    let m = entry(pid, &path);
    assert_eq!(
        m.path.as_deref(),
        Some(format!("{path} (deleted)").as_str())
    );
    let (id, _) = c.vma_object(pid, &m).expect("vma_object").expect("object");
    let (obj, p, deleted) = posix_obj(&c);
    assert_eq!((p.as_str(), deleted), (path.as_str(), true));
    assert_eq!(obj.size, size as u64);
    let mut pages = Pages::default();
    c.dump_contents(id, &mut pages).expect("dump");
    drop(child);
    assert_eq!(pages.image(size), data);
    let tree = tree_with(obj);

    // Made under its own name, unlinked at once.
    let mut h = ShmemHandles::create(&tree).expect("create");
    assert_eq!(handle(&h, id).undo, Undo::Nothing);
    assert!(std::fs::metadata(&path).is_err(), "{path} left linked");
    h.fill(id, &pages.batch()).expect("fill");
    assert_eq!(read_back(&h, id), data);
    let MapSource::Path(src) = h.map_source(id).expect("source") else {
        panic!("not a path")
    };
    assert_eq!(
        std::fs::read_link(&src)
            .expect("readlink")
            .to_string_lossy(),
        format!("{path} (deleted)")
    );
    let md = std::fs::metadata(&src).expect("stat");
    assert_eq!((md.nlink(), md.mode() & 0o7777), (0, 0o600));
    h.finish().expect("finish");
    h.commit();
    drop(h);

    // The name is taken by another file: an O_TMPFILE, the other file
    // untouched.
    std::fs::write(&path, b"other").expect("other file");
    let mut h = ShmemHandles::create(&tree).expect("create");
    h.fill(id, &pages.batch()).expect("fill");
    assert_eq!(read_back(&h, id), data);
    let MapSource::Path(src) = h.map_source(id).expect("source") else {
        panic!("not a path")
    };
    let link = std::fs::read_link(&src).expect("readlink");
    let link = link.to_string_lossy();
    assert!(
        link.starts_with("/dev/shm/#") && link.ends_with(" (deleted)"),
        "{link}"
    );
    drop(h);
    assert_eq!(std::fs::read(&path).expect("other"), b"other");
}

#[test]
fn shmem_posix_refuses_paths_outside_dev_shm() {
    for bad in ["/dev/shm/../etc/x", "/tmp/x", "/dev/shm/", "/dev/shm/a//b"] {
        let obj = ShmemObject {
            id: 1,
            size: PAGE_SIZE,
            kind: ShmemKind::Posix {
                path: bad.into(),
                mode: 0o600,
                uid: 0,
                gid: 0,
                deleted: false,
            },
        };
        let e = ShmemHandles::create(&tree_with(obj)).err().expect(bad);
        assert!(e.to_string().contains("not a file in /dev/shm"), "{e}");
    }
}

// ---------------------------------------------------------------- SysV

/// A segment removed on drop (gone at once or with its last detach).
struct Segment(i32);

impl Drop for Segment {
    fn drop(&mut self) {
        sysv::remove(self.0);
    }
}

fn shmget(key: i32, size: usize, flags: i32) -> Segment {
    // SAFETY: integer arguments only.
    let id = unsafe { libc::shmget(key, size, flags) };
    assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
    Segment(id)
}

fn shmat(id: i32, len: u64, flags: i32) -> Mapping {
    // SAFETY: a fresh attachment chosen by the kernel, adopted once.
    unsafe {
        let p = libc::shmat(id, std::ptr::null(), flags);
        assert_ne!(p as isize, -1, "shmat: {}", std::io::Error::last_os_error());
        Mapping::adopt(p.cast(), len)
    }
}

/// `shmat(id)`, the address (unmapped by hand with [`unmap_raw`]).
fn shmat_raw(id: i32) -> usize {
    // SAFETY: a fresh attachment chosen by the kernel.
    let p = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    assert_ne!(p as isize, -1, "shmat: {}", std::io::Error::last_os_error());
    p as usize
}

fn unmap_raw(addr: usize, len: usize) {
    // SAFETY: only called on pages of an attachment made by `shmat_raw`
    // that nothing else refers to, each once.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

fn shm_stat(id: i32) -> Option<libc::shmid_ds> {
    // SAFETY: IPC_STAT writes one shmid_ds into a zeroed local.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        (libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0).then_some(ds)
    }
}

fn nattch(id: i32) -> u64 {
    shm_stat(id).map_or(u64::MAX, |d| d.shm_nattch)
}

fn segment_bytes(id: i32, len: u64) -> Vec<u8> {
    let m = shmat(id, len, libc::SHM_RDONLY);
    m.slice(0, len).to_vec()
}

/// A key of our own: unlikely to be anyone else's.
fn our_key() -> i32 {
    static N: AtomicU32 = AtomicU32::new(0);
    (0x3e00_0000
        | ((std::process::id() & 0xffff) << 8)
        | (N.fetch_add(1, Ordering::Relaxed) & 0xff)) as i32
}

#[test]
fn shmem_sysv_round_trip_reuse_and_fresh_id() {
    let _l = sysv_lock();
    let key = our_key();
    let segsz = 3 * PAGE + 10;
    let len = 4 * PAGE_SIZE;
    let seg = shmget(key, segsz, libc::IPC_CREAT | libc::IPC_EXCL | 0o640);
    let id = seg.0;
    let data = pattern(len as usize, &[0, 3]);
    let mut m = shmat(id, len, 0);
    write_pages(&mut m, &data);
    let child = fork_paused();
    drop(m);
    let pid = child.0;
    assert_eq!(nattch(id), 1);

    let mut c = ShmemCollector::new();
    let e = entry(pid, &format!("/SYSV{:08x}", key as u32));
    let (oid, off) = c.vma_object(pid, &e).expect("vma_object").expect("object");
    assert_eq!(off, 0);
    let obj = the_one(&c);
    assert_eq!(
        obj.kind,
        ShmemKind::SysV {
            shmid: id,
            key,
            mode: 0o640,
            uid: 0,
            gid: 0
        }
    );
    assert_eq!(obj.size, len);
    let mut pages = Pages::default();
    c.dump_contents(oid, &mut pages).expect("dump");
    assert_eq!(nattch(id), 1, "the dump's attachment is gone");
    assert_eq!(pages.image(len as usize), data);
    assert_eq!(pages.0.len(), 2, "only the written pages");
    drop(child);
    assert_eq!(nattch(id), 0);
    let tree = tree_with(obj);

    // Reuse: the segment outlived the tree, with stale bytes in it.
    shmat(id, len, 0)
        .write(PAGE_SIZE, &[0xee; PAGE])
        .expect("scribble");
    {
        let mut h = ShmemHandles::create(&tree).expect("create");
        assert_eq!(handle(&h, oid).undo, Undo::Nothing);
        assert_eq!(h.map_source(oid).expect("source"), MapSource::SysV(id));
        assert_eq!(nattch(id), 1);
        h.fill(oid, &pages.batch()).expect("fill");
        assert_eq!(segment_bytes(id, len), data);
    }
    assert!(
        shm_stat(id).is_some(),
        "an unfinished restore removed a reused segment"
    );
    assert_eq!(nattch(id), 0);

    // Fresh: the segment is gone (another host, or removed): made again
    // with the same id, key, mode and owner; removed by an unfinished
    // restore, kept by a finished one.
    drop(seg);
    assert!(shm_stat(id).is_none());
    {
        let mut h = ShmemHandles::create(&tree).expect("create fresh");
        assert_eq!(handle(&h, oid).undo, Undo::RemoveSegment(id));
        h.fill(oid, &pages.batch()).expect("fill");
        assert_eq!(segment_bytes(id, len), data);
    }
    assert!(shm_stat(id).is_none(), "undo left segment {id}");
    let mut h = ShmemHandles::create(&tree).expect("create fresh");
    let _seg = Segment(id);
    h.fill(oid, &pages.batch()).expect("fill");
    let ds = shm_stat(id).expect("made");
    assert_eq!(ds.shm_perm.__key, key);
    assert_eq!(ds.shm_perm.mode & 0o777, 0o640);
    assert_eq!(ds.shm_segsz as u64, len);
    // A target attaches it (map_areas' injected shmat); after finish only
    // the target's attachment is left.
    let target = shmat(id, len, 0);
    assert_eq!(nattch(id), 2);
    h.finish().expect("finish");
    h.commit();
    assert_eq!(nattch(id), 1);
    assert_eq!(target.slice(0, len), &data[..]);
    drop(h);
    drop(target);
    assert_eq!(nattch(id), 0);
    assert!(
        shm_stat(id).is_some(),
        "a finished restore keeps its segment"
    );
}

#[test]
fn shmem_sysv_id_taken_and_partial() {
    let _l = sysv_lock();
    let seg = shmget(libc::IPC_PRIVATE, 2 * PAGE, libc::IPC_CREAT | 0o600);
    let id = seg.0;
    // An image segment with this id but another size: refused, naming both.
    let obj = ShmemObject {
        id: 1,
        size: 4 * PAGE_SIZE,
        kind: ShmemKind::SysV {
            shmid: id,
            key: 0,
            mode: 0o600,
            uid: 0,
            gid: 0,
        },
    };
    let e = ShmemHandles::create(&tree_with(obj))
        .err()
        .expect("id taken");
    let s = e.to_string();
    assert!(
        s.contains(&format!("SysV segment {id}")) && s.contains("taken") && s.contains("0x2000"),
        "{s}"
    );
    // A partial attachment (the first page unmapped) is refused.
    let start = shmat_raw(id);
    unmap_raw(start, PAGE);
    let me = std::process::id() as i32;
    let e = entry(me, "/SYSV00000000");
    let r = ShmemCollector::new().vma_object(me, &e);
    unmap_raw(start + PAGE, PAGE);
    let s = r.expect_err("partial attachment").to_string();
    assert!(
        s.contains("partial attachment") && s.contains(&id.to_string()),
        "{s}"
    );
}

#[test]
fn shmem_sysv_removed_while_attached() {
    let _l = sysv_lock();
    let len = 2 * PAGE_SIZE;
    let seg = shmget(libc::IPC_PRIVATE, len as usize, libc::IPC_CREAT | 0o600);
    let id = seg.0;
    let data = pattern(len as usize, &[1]);
    let mut m = shmat(id, len, 0);
    write_pages(&mut m, &data);
    sysv::remove(id);
    let child = fork_paused();
    drop(m);
    let pid = child.0;
    let mut c = ShmemCollector::new();
    let e = entry(pid, "/SYSV00000000");
    let (oid, _) = c.vma_object(pid, &e).expect("vma_object").expect("object");
    let obj = the_one(&c);
    assert_eq!(
        obj.kind,
        ShmemKind::SysV {
            shmid: id,
            key: 0,
            mode: 0o600 | sysv::SHM_DEST,
            uid: 0,
            gid: 0
        }
    );
    let mut pages = Pages::default();
    c.dump_contents(oid, &mut pages).expect("dump");
    assert_eq!(pages.image(len as usize), data);
    drop(child);
    assert!(shm_stat(id).is_none(), "gone with its last detach");
    drop(seg);

    // Made again with its id, removed at once, still attachable by id.
    let tree = tree_with(obj);
    let mut h = ShmemHandles::create(&tree).expect("create");
    assert_eq!(handle(&h, oid).undo, Undo::Nothing);
    let _seg = Segment(id);
    h.fill(oid, &pages.batch()).expect("fill");
    let ds = shm_stat(id).expect("there while attached");
    assert_eq!(u32::from(ds.shm_perm.mode) & sysv::SHM_DEST, sysv::SHM_DEST);
    let target = shmat(id, len, 0);
    h.finish().expect("finish");
    h.commit();
    assert_eq!(nattch(id), 1);
    assert_eq!(target.slice(0, len), &data[..]);
    drop(target);
    assert!(shm_stat(id).is_none(), "gone with the last detach");
}
