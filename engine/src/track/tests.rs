//! Tracker tests against a real child process whose writes are known.

use super::*;
use ferry_protocol::model::VmaKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const PAGE: u64 = 4096;
/// Pages of the child's initial anonymous area.
const ANON_PAGES: u64 = 8;
/// Pages of the child's private file mapping.
const FILE_PAGES: u64 = 4;

const OP_EXIT: u64 = 0;
const OP_WRITE: u64 = 1;
const OP_READ: u64 = 2;
const OP_MMAP: u64 = 3;
const OP_MUNMAP: u64 = 4;
const OP_MPROTECT: u64 = 5;
const OP_MADVISE: u64 = 6;
const OP_MREMAP: u64 = 7;
const OP_USERFAULTFD: u64 = 8;
const OP_BRK: u64 = 9;
const OP_MMAP_DROPPABLE: u64 = 10;
const OP_MMAP_AT: u64 = 11;
/// `MAP_DROPPABLE` (Linux 6.11), not in the libc crate everywhere.
const MAP_DROPPABLE: i32 = 0x08;

const CMD_FD: i32 = 50;
const ACK_FD: i32 = 51;

/// A forked child obeying commands from a pipe; killed and reaped on drop.
struct Target {
    pid: i32,
    cmd: OwnedFd,
    ack: OwnedFd,
    /// Its anonymous area of [`ANON_PAGES`] pages.
    anon: u64,
    /// Its private file mapping of [`FILE_PAGES`] pages.
    file: u64,
    _tmp: std::path::PathBuf,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [-1; 2];
    // SAFETY: pipe2 fills the two-element array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

/// The child's main loop: raw system calls only, no allocation.
///
/// # Safety
/// Runs in a forked child only; never returns.
unsafe fn child_main(cmd_r: i32, ack_w: i32, file_fd: i32, own_uffd: bool) -> ! {
    // SAFETY (whole body): async-signal-safe calls on plain integers and
    // stack buffers; memory accessed is what the test told us to touch.
    unsafe {
        if libc::dup2(cmd_r, CMD_FD) < 0 || libc::dup2(ack_w, ACK_FD) < 0 {
            libc::_exit(10);
        }
        let anon = libc::mmap(
            std::ptr::null_mut(),
            (ANON_PAGES * PAGE) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        let file = libc::mmap(
            std::ptr::null_mut(),
            (FILE_PAGES * PAGE) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file_fd,
            0,
        );
        if anon == libc::MAP_FAILED || file == libc::MAP_FAILED {
            libc::_exit(11);
        }
        libc::syscall(libc::SYS_close_range, 3u32, (CMD_FD - 1) as u32, 0u32);
        libc::syscall(libc::SYS_close_range, (ACK_FD + 1) as u32, u32::MAX, 0u32);
        if own_uffd && libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) < 0 {
            libc::_exit(12);
        }
        let reply = |v: u64| {
            let b = v.to_ne_bytes();
            if libc::write(ACK_FD, b.as_ptr().cast(), 8) != 8 {
                libc::_exit(13);
            }
        };
        reply(anon as u64);
        reply(file as u64);
        loop {
            let mut m = [0u64; 4];
            let mut got = 0usize;
            while got < 32 {
                let r = libc::read(
                    CMD_FD,
                    m.as_mut_ptr().cast::<u8>().add(got).cast(),
                    32 - got,
                );
                if r <= 0 {
                    libc::_exit(0);
                }
                got += r as usize;
            }
            let [op, a, b, c] = m;
            let r: i64 = match op {
                OP_EXIT => libc::_exit(0),
                OP_WRITE => {
                    (a as *mut u8).write_volatile(b as u8);
                    0
                }
                OP_READ => (a as *const u8).read_volatile() as i64,
                OP_MMAP => libc::mmap(
                    std::ptr::null_mut(),
                    a as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ) as i64,
                OP_MUNMAP => libc::munmap(a as *mut _, b as usize) as i64,
                OP_MPROTECT => libc::mprotect(a as *mut _, b as usize, c as i32) as i64,
                OP_MADVISE => libc::madvise(a as *mut _, b as usize, c as i32) as i64,
                OP_MREMAP => libc::syscall(
                    libc::SYS_mremap,
                    a,
                    b,
                    b,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    c,
                ),
                OP_USERFAULTFD => libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC),
                OP_BRK => libc::syscall(libc::SYS_brk, a),
                OP_MMAP_DROPPABLE => libc::mmap(
                    std::ptr::null_mut(),
                    a as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    MAP_DROPPABLE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ) as i64,
                OP_MMAP_AT => libc::mmap(
                    a as *mut _,
                    b as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                ) as i64,
                _ => -1,
            };
            reply(r as u64);
        }
    }
}

impl Target {
    fn spawn(own_uffd: bool) -> Target {
        let tmp = std::env::temp_dir().join(format!(
            "ferry-track-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&tmp, vec![0x5a; (FILE_PAGES * PAGE) as usize]).expect("temp file");
        let file = std::fs::File::open(&tmp).expect("open temp file");
        let (cmd_r, cmd_w) = pipe();
        let (ack_r, ack_w) = pipe();
        // SAFETY: the child runs `child_main` (raw system calls, no
        // allocation, no locks) and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: we are the forked child.
            unsafe {
                child_main(
                    cmd_r.as_raw_fd(),
                    ack_w.as_raw_fd(),
                    file.as_raw_fd(),
                    own_uffd,
                )
            }
        }
        drop((cmd_r, ack_w, file));
        let mut t = Target {
            pid,
            cmd: cmd_w,
            ack: ack_r,
            anon: 0,
            file: 0,
            _tmp: tmp,
        };
        t.anon = t.recv();
        t.file = t.recv();
        t
    }

    /// Read one reply, failing after 5 s.
    fn recv(&self) -> u64 {
        let mut pfd = libc::pollfd {
            fd: self.ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "child {} did not answer within 5 s", self.pid);
        let mut b = [0u8; 8];
        // SAFETY: read into a local 8-byte buffer.
        let r = unsafe { libc::read(self.ack.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        assert_eq!(r, 8, "short reply from child {}", self.pid);
        u64::from_ne_bytes(b)
    }

    fn call(&self, op: u64, a: u64, b: u64, c: u64) -> i64 {
        let m = [op, a, b, c];
        // SAFETY: write of a local 32-byte buffer.
        let r = unsafe { libc::write(self.cmd.as_raw_fd(), m.as_ptr().cast(), 32) };
        assert_eq!(r, 32);
        self.recv() as i64
    }

    fn write(&self, addr: u64) {
        assert_eq!(self.call(OP_WRITE, addr, 0x77, 0), 0);
    }

    fn mmap(&self, pages: u64) -> u64 {
        let a = self.call(OP_MMAP, pages * PAGE, 0, 0);
        assert!(a > 0, "mmap in child: {a}");
        a as u64
    }

    fn ok(&self, op: u64, a: u64, b: u64, c: u64) {
        assert_eq!(self.call(op, a, b, c), 0, "op {op} in child");
    }
}

static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for Target {
    fn drop(&mut self) {
        crate::files::testkit::kill_and_reap(self.pid);
        let _ = std::fs::remove_file(&self._tmp);
    }
}

/// The private areas of `pid` as the caller of `collect` would pass them.
fn vmas(pid: i32) -> Vec<Vma> {
    private_areas(pid)
        .expect("maps")
        .into_iter()
        .map(|r| Vma {
            start: r.start,
            end: r.end,
            prot: 0,
            flags: libc::MAP_PRIVATE as u32,
            kind: VmaKind::Anonymous,
            name: None,
        })
        .collect()
}

fn start_tracking(pid: i32) -> Result<Box<dyn DirtyTracker>> {
    let mut frozen = Frozen::freeze(pid).expect("freeze");
    let t = start(pid, &mut frozen);
    frozen.thaw().expect("thaw");
    let mut t = t?;
    t.arm()?;
    Ok(t)
}

fn collect(t: &mut dyn DirtyTracker, pid: i32) -> Vec<PageRange> {
    let mut out = Vec::new();
    t.collect(&vmas(pid), &mut out).expect("collect");
    let mut check = out.clone();
    normalize(&mut check);
    assert_eq!(check, out, "collect output is sorted and merged");
    out
}

/// Page indices (from `base`) of the reported pages in `[base, base + pages)`.
fn pages_in(out: &[PageRange], base: u64, pages: u64) -> Vec<u64> {
    let end = base + pages * PAGE;
    let mut v = Vec::new();
    for r in out {
        let mut a = r.start.max(base);
        while a < r.end.min(end) {
            v.push((a - base) / PAGE);
            a += PAGE;
        }
    }
    v
}

fn all(n: u64) -> Vec<u64> {
    (0..n).collect()
}

#[test]
fn soft_dirty_is_compiled_out_here() {
    // KERNEL-FACTS/DESIGN: CONFIG_MEM_SOFT_DIRTY is unset on the project's
    // machines; clear_refs succeeds but bit 55 never gets set. If this
    // fails, the kernel changed: the soft-dirty backend test below now runs.
    assert!(!soft_dirty::available());
}

#[test]
fn soft_dirty_backend_reports_written_pages() {
    if !soft_dirty::available() {
        eprintln!("note: soft-dirty is not available on this kernel; backend test skipped");
        return;
    }
    let t = Target::spawn(false);
    let frozen = Frozen::freeze(t.pid).expect("freeze");
    let tr = soft_dirty::SoftDirtyTracker::start(t.pid);
    frozen.thaw().expect("thaw");
    let mut tr: Box<dyn DirtyTracker> = Box::new(tr.expect("soft-dirty start"));
    assert_eq!(tr.backend(), "soft-dirty");
    for i in [1, 5, 6] {
        t.write(t.anon + i * PAGE);
    }
    let out = collect(tr.as_mut(), t.pid);
    assert_eq!(pages_in(&out, t.anon, ANON_PAGES), vec![1, 5, 6]);
    assert!(pages_in(&collect(tr.as_mut(), t.pid), t.anon, ANON_PAGES).is_empty());
    tr.stop().expect("stop");
}

#[test]
fn uffd_wp_reports_exactly_the_written_pages() {
    let t = Target::spawn(false);
    let mut tr = start_tracking(t.pid).expect("start tracking");
    assert_eq!(tr.backend(), "uffd-wp");
    let tr = tr.as_mut();
    let pid = t.pid;

    for i in [1, 5, 6] {
        t.write(t.anon + i * PAGE);
    }
    let out = collect(tr, pid);
    assert_eq!(pages_in(&out, t.anon, ANON_PAGES), vec![1, 5, 6]);
    assert!(pages_in(&out, t.file, FILE_PAGES).is_empty());

    let out = collect(tr, pid);
    assert!(pages_in(&out, t.anon, ANON_PAGES).is_empty(), "{out:x?}");

    t.write(t.anon + 3 * PAGE);
    let out = collect(tr, pid);
    assert_eq!(pages_in(&out, t.anon, ANON_PAGES), vec![3]);

    // Private file mapping: a read maps the page cache, not reported; a
    // write makes a private copy, reported.
    assert_eq!(t.call(OP_READ, t.file + 2 * PAGE, 0, 0), 0x5a);
    t.write(t.file + PAGE);
    let out = collect(tr, pid);
    assert_eq!(pages_in(&out, t.file, FILE_PAGES), vec![1]);
    assert!(pages_in(&out, t.anon, ANON_PAGES).is_empty());
    assert!(pages_in(&collect(tr, pid), t.file, FILE_PAGES).is_empty());

    // A new area: reported whole once, then only its written pages.
    let new = t.mmap(4);
    let out = collect(tr, pid);
    assert_eq!(pages_in(&out, new, 4), all(4));
    assert!(pages_in(&collect(tr, pid), new, 4).is_empty());
    t.write(new + 2 * PAGE);
    assert_eq!(pages_in(&collect(tr, pid), new, 4), vec![2]);

    // Unmapped: forgotten without error; mapped again (likely at the same
    // address): reported whole again.
    t.ok(OP_MUNMAP, new, 4 * PAGE, 0);
    assert!(pages_in(&collect(tr, pid), new, 4).is_empty());
    let again = t.mmap(4);
    assert_eq!(pages_in(&collect(tr, pid), again, 4), all(4));
    assert!(pages_in(&collect(tr, pid), again, 4).is_empty());

    // mprotect keeps tracking: a write before making it read-only is
    // reported, protection changes alone are not, and later writes are.
    t.write(again + PAGE);
    t.ok(OP_MPROTECT, again, 4 * PAGE, libc::PROT_READ as u64);
    assert_eq!(pages_in(&collect(tr, pid), again, 4), vec![1]);
    t.ok(
        OP_MPROTECT,
        again + 2 * PAGE,
        2 * PAGE,
        libc::PROT_NONE as u64,
    );
    assert!(pages_in(&collect(tr, pid), again, 4).is_empty());
    t.ok(
        OP_MPROTECT,
        again,
        4 * PAGE,
        (libc::PROT_READ | libc::PROT_WRITE) as u64,
    );
    assert!(pages_in(&collect(tr, pid), again, 4).is_empty());
    t.write(again + 3 * PAGE);
    t.write(again);
    assert_eq!(pages_in(&collect(tr, pid), again, 4), vec![0, 3]);

    // Pages dropped with MADV_DONTNEED now read as zero: reported once.
    t.ok(
        OP_MADVISE,
        t.anon + 5 * PAGE,
        PAGE,
        libc::MADV_DONTNEED as u64,
    );
    assert_eq!(pages_in(&collect(tr, pid), t.anon, ANON_PAGES), vec![5]);
    assert!(pages_in(&collect(tr, pid), t.anon, ANON_PAGES).is_empty());

    // mremap to a new place: the moved area is reported whole there.
    let dst = t.mmap(4);
    t.ok(OP_MUNMAP, dst, 4 * PAGE, 0);
    let moved = t.call(OP_MREMAP, again, 4 * PAGE, dst);
    assert_eq!(moved as u64, dst, "mremap in child");
    assert_eq!(pages_in(&collect(tr, pid), dst, 4), all(4));
    t.write(dst + PAGE);
    assert_eq!(pages_in(&collect(tr, pid), dst, 4), vec![1]);

    // brk growth: the new part of the heap is reported whole, then exactly.
    let old_brk = t.call(OP_BRK, 0, 0, 0) as u64;
    let new_brk = t.call(OP_BRK, old_brk + 4 * PAGE, 0, 0) as u64;
    assert_eq!(new_brk, old_brk + 4 * PAGE, "brk in child");
    let heap_new = old_brk.next_multiple_of(PAGE);
    let grown = (new_brk.next_multiple_of(PAGE) - heap_new) / PAGE;
    assert_eq!(pages_in(&collect(tr, pid), heap_new, grown), all(grown));
    assert!(pages_in(&collect(tr, pid), heap_new, grown).is_empty());
    t.write(heap_new + PAGE);
    assert_eq!(pages_in(&collect(tr, pid), heap_new, grown), vec![1]);

    // MAP_DROPPABLE memory cannot be registered: reported whole each pass,
    // without error, while the rest stays exact.
    let drop_area = t.call(OP_MMAP_DROPPABLE, 2 * PAGE, 0, 0);
    assert!(drop_area > 0, "MAP_DROPPABLE mmap in child: {drop_area}");
    let drop_area = drop_area as u64;
    for _ in 0..4 {
        let out = collect(tr, pid);
        assert_eq!(pages_in(&out, drop_area, 2), all(2));
        assert!(pages_in(&out, t.anon, ANON_PAGES).is_empty());
    }
    t.ok(OP_MUNMAP, drop_area, 2 * PAGE, 0);

    // The original area is still tracked exactly.
    t.write(t.anon + 7 * PAGE);
    assert_eq!(pages_in(&collect(tr, pid), t.anon, ANON_PAGES), vec![7]);
}

/// Areas that change identity in place (what `wl-lazy` does between
/// pre-copy passes) are reported whole: a part of a registered area
/// unmapped and mapped again at the same address, a part moved away and
/// back with `mremap`, and a moved area that merges with a registered
/// neighbour at its destination (the kernel drops the registration of the
/// merged area).
#[test]
fn uffd_wp_reports_areas_replaced_or_moved_back() {
    let t = Target::spawn(false);
    let pid = t.pid;
    // One area of 16 pages, all written, tracked from the start.
    let w = t.mmap(16);
    for i in 0..16 {
        t.write(w + i * PAGE);
    }
    let mut tr = start_tracking(pid).expect("start tracking");
    let tr = tr.as_mut();
    assert!(pages_in(&collect(tr, pid), w, 16).is_empty());

    // Pages 4-5 unmapped and mapped again in place: reported, once.
    t.ok(OP_MUNMAP, w + 4 * PAGE, 2 * PAGE, 0);
    assert_eq!(
        t.call(OP_MMAP_AT, w + 4 * PAGE, 2 * PAGE, 0) as u64,
        w + 4 * PAGE
    );
    assert_eq!(pages_in(&collect(tr, pid), w, 16), vec![4, 5]);
    assert!(pages_in(&collect(tr, pid), w, 16).is_empty());

    // Pages 12-15 moved away and straight back: reported, once.
    let dst = t.mmap(4);
    let moved = t.call(OP_MREMAP, w + 12 * PAGE, 4 * PAGE, dst);
    assert_eq!(moved as u64, dst, "mremap away");
    let back = t.call(OP_MREMAP, dst, 4 * PAGE, w + 12 * PAGE);
    assert_eq!(back as u64, w + 12 * PAGE, "mremap back");
    assert_eq!(pages_in(&collect(tr, pid), w, 16), vec![12, 13, 14, 15]);
    assert!(pages_in(&collect(tr, pid), w, 16).is_empty());

    // Moved away, tracked there, then moved back next to its registered
    // neighbour (merging with it): the moved pages are reported.
    let dst = t.mmap(4);
    let moved = t.call(OP_MREMAP, w + 12 * PAGE, 4 * PAGE, dst);
    assert_eq!(moved as u64, dst, "mremap away");
    assert_eq!(pages_in(&collect(tr, pid), dst, 4), all(4));
    assert!(pages_in(&collect(tr, pid), dst, 4).is_empty());
    let back = t.call(OP_MREMAP, dst, 4 * PAGE, w + 12 * PAGE);
    assert_eq!(back as u64, w + 12 * PAGE, "mremap back");
    // (Kernel 6.18: the whole merged area, 0-15, lost its registration
    // and is reported; what matters is that the moved pages are.)
    let got = pages_in(&collect(tr, pid), w, 16);
    for p in 12..16 {
        assert!(got.contains(&p), "moved page {p} reported: {got:?}");
    }
    assert!(pages_in(&collect(tr, pid), w, 16).is_empty());
    t.write(w + 13 * PAGE);
    assert_eq!(pages_in(&collect(tr, pid), w, 16), vec![13]);
}

fn fd_table(pid: i32) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .map(|e| {
            let l = std::fs::read_link(e.path()).expect("fd link");
            (
                e.file_name().to_string_lossy().into_owned(),
                l.to_string_lossy().into_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

fn maps_text(pid: i32) -> String {
    crate::procfs::read(pid, "maps").expect("maps")
}

#[test]
fn uffd_wp_stop_leaves_the_target_as_before() {
    let t = Target::spawn(false);
    let (fds0, maps0) = (fd_table(t.pid), maps_text(t.pid));
    assert!(uffd_registered_areas(t.pid).expect("smaps").is_empty());

    let mut tr = start_tracking(t.pid).expect("start tracking");
    // While tracking: no fd of ours in the target, areas registered.
    assert_eq!(fd_table(t.pid), fds0);
    assert!(!uffd_registered_areas(t.pid).expect("smaps").is_empty());
    t.write(t.anon + 2 * PAGE);
    t.write(t.file);
    let out = collect(tr.as_mut(), t.pid);
    assert_eq!(pages_in(&out, t.anon, ANON_PAGES), vec![2]);
    t.write(t.anon + 4 * PAGE);
    tr.stop().expect("stop");

    assert_eq!(fd_table(t.pid), fds0);
    assert_eq!(maps_text(t.pid), maps0);
    assert!(uffd_registered_areas(t.pid).expect("smaps").is_empty());
    // Writes after stop complete (the ack arrives within the 5 s bound).
    for i in 0..ANON_PAGES {
        t.write(t.anon + i * PAGE);
    }
    t.write(t.file + 3 * PAGE);
    assert_eq!(t.call(OP_READ, t.anon + 4 * PAGE, 0, 0), 0x77);
}

#[test]
fn uffd_wp_drop_without_stop_also_cleans_up() {
    let t = Target::spawn(false);
    let maps0 = maps_text(t.pid);
    let tr = start_tracking(t.pid).expect("start tracking");
    drop(tr);
    assert_eq!(maps_text(t.pid), maps0);
    assert!(uffd_registered_areas(t.pid).expect("smaps").is_empty());
    t.write(t.anon);
}

#[test]
fn target_with_its_own_userfaultfd_is_refused_clearly() {
    let t = Target::spawn(true);
    let reason = target_userfaultfd(t.pid).expect("fd scan");
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("anon_inode:[userfaultfd]")),
        "{reason:?}"
    );
    let fds0 = fd_table(t.pid);
    let err = match start_tracking(t.pid) {
        Ok(tr) => {
            // Only acceptable on a kernel with soft-dirty.
            assert_eq!(tr.backend(), "soft-dirty");
            return;
        }
        Err(e) => e,
    };
    assert!(!soft_dirty::available());
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("uses userfaultfd itself"), "{msg}");
    assert!(msg.contains("soft-dirty is not available"), "{msg}");
    assert!(backend_for(t.pid).is_err());
    // Untouched and still running.
    assert_eq!(fd_table(t.pid), fds0);
    t.write(t.anon);
}

#[test]
fn backend_for_plain_target_is_uffd_wp() {
    let t = Target::spawn(false);
    assert_eq!(backend_for(t.pid).expect("backend"), "uffd-wp");
}

fn r(start: u64, end: u64) -> PageRange {
    PageRange { start, end }
}

#[test]
fn normalize_and_subtract() {
    let mut v = vec![r(8, 12), r(0, 4), r(4, 6), r(10, 16), r(20, 20)];
    normalize(&mut v);
    assert_eq!(v, vec![r(0, 6), r(8, 16)]);
    assert_eq!(
        subtract(&[r(0, 10), r(20, 30)], &[r(2, 4), r(8, 22), r(25, 26)]),
        vec![r(0, 2), r(4, 8), r(22, 25), r(26, 30)]
    );
    assert_eq!(subtract(&[r(0, 10)], &[]), vec![r(0, 10)]);
    assert!(subtract(&[r(4, 8)], &[r(0, 10)]).is_empty());
}
