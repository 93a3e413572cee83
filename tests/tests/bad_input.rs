//! Bad input: each case is a clear error (status 1, `error: ...` on stderr)
//! and leaves the original process running untouched.
mod common;

use common::{num, Procs, Workload};
use std::path::Path;

const WL_MEMORY: &str = env!("CARGO_BIN_EXE_wl-memory");
const WL_TRACER: &str = env!("CARGO_BIN_EXE_wl-tracer");
const WL_SOCKET: &str = env!("CARGO_BIN_EXE_wl-socket");

/// wl-memory (8 MiB): returns it and (addr, len, checksum) of its pattern.
fn start_memory(procs: &mut Procs, dir: &Path) -> (Workload, (u64, usize, u64)) {
    let wl = procs.workload(
        WL_MEMORY,
        &["8", dir.to_str().expect("utf-8")],
        dir,
        "memory",
    );
    let (_, ready) = wl.out.wait_line(0, "ready ");
    let region = (
        num(&ready, "addr"),
        num(&ready, "len") as usize,
        num(&ready, "checksum"),
    );
    wl.out.wait_tick_above(2);
    (wl, region)
}

/// Still ticking, same memory, and its own memory check passes.
fn assert_untouched(wl: &Workload, region: (u64, usize, u64)) {
    let last = wl.out.last_tick().expect("ticks");
    wl.out.wait_tick_above(last + 3);
    assert_eq!(
        common::mem_checksum(wl.pid, region.0, region.1),
        region.2,
        "memory of {} changed",
        wl.pid
    );
    let from = wl.out.lines().len();
    common::signal(wl.pid, libc::SIGUSR1);
    let (_, v) = wl.out.wait_line(from, "verify ");
    assert!(v.starts_with("verify ok "), "{v}");
}

/// True if `text` contains `n` as a whole number (not part of a longer one).
fn mentions_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|tok| tok == n.to_string())
}

#[test]
fn checkpoint_of_a_missing_pid_fails() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    // A PID that just became free: wl-tracer without arguments exits at once.
    let gone = procs.workload(WL_TRACER, &[], tmp.path(), "gone");
    procs.reap(gone.pid).expect("reap");
    assert!(!common::pid_exists(gone.pid));
    let run = common::checkpoint(gone.pid, &tmp.path().join("img"), false);
    run.assert_error(&[]);
    assert!(
        mentions_number(&run.stderr, gone.pid as u64),
        "error should name pid {}: {}",
        gone.pid,
        run.stderr
    );
}

#[test]
fn checkpoint_of_a_pid_traced_by_another_tracer_fails() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, region) = start_memory(&mut procs, tmp.path());
    let tracer = procs.workload(WL_TRACER, &[&wl.pid.to_string()], tmp.path(), "tracer");
    tracer.out.wait_line(0, "tracing ");
    assert_eq!(
        common::status_field(wl.pid, "TracerPid"),
        tracer.pid.to_string()
    );

    let run = common::checkpoint(wl.pid, &tmp.path().join("img"), false);
    run.assert_error(&["trac"]);
    assert_eq!(
        common::status_field(wl.pid, "TracerPid"),
        tracer.pid.to_string(),
        "the other tracer must keep its tracee"
    );
    let state = common::state(wl.pid);
    assert!(
        matches!(state, 'R' | 'S'),
        "traced process left in state {state}"
    );
    let last = wl.out.last_tick().expect("ticks");
    wl.out.wait_tick_above(last + 3);

    procs.kill(tracer.pid).expect("reap tracer");
    common::assert_running_untraced(wl.pid);
    assert_untouched(&wl, region);
}

/// Checkpoint with --leave-running, then end the original so its PID is free.
fn image_of_ended_process(procs: &mut Procs, dir: &Path) -> (i32, std::path::PathBuf) {
    let (wl, _) = start_memory(procs, dir);
    let img = dir.join("img");
    common::checkpoint(wl.pid, &img, true).assert_ok();
    procs.kill(wl.pid).expect("reap original");
    assert!(!common::pid_exists(wl.pid));
    (wl.pid, img.join("process.img"))
}

#[test]
fn restore_refuses_an_image_with_a_broken_checksum() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (pid, image) = image_of_ended_process(&mut procs, tmp.path());
    let mut bytes = std::fs::read(&image).expect("read process.img");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&image, &bytes).expect("write process.img");

    let run = common::restore(image.parent().expect("dir"));
    run.assert_error(&["checksum"]);
    assert!(
        !common::pid_exists(pid),
        "a failed restore left process {pid} behind"
    );
}

/// An image another user could have rewritten is refused before it is
/// read (restore runs as root and would run what they put there); once
/// only root can write it, the same image restores.
#[test]
fn restore_refuses_an_image_others_could_write() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (pid, image) = image_of_ended_process(&mut procs, tmp.path());
    let dir = image.parent().expect("dir").to_path_buf();
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    chmod(&image, 0o666);
    common::restore(&dir).assert_error(&["refusing to restore", "process.img", "chmod go-w"]);
    assert!(
        !common::pid_exists(pid),
        "a refused restore made process {pid}"
    );
    chmod(&image, 0o644);
    chmod(&dir, 0o777);
    common::restore(&dir).assert_error(&["refusing to restore", "writable by group or others"]);
    assert!(
        !common::pid_exists(pid),
        "a refused restore made process {pid}"
    );
    chmod(&dir, 0o755);
    common::restore(&dir).assert_ok();
    procs.adopt(pid);
    common::assert_running_untraced(pid);
    procs.kill(pid).expect("reap the restored process");
}

#[test]
fn restore_refuses_an_image_of_a_newer_version() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (pid, image) = image_of_ended_process(&mut procs, tmp.path());
    let mut bytes = std::fs::read(&image).expect("read process.img");
    assert!(bytes.len() > 12, "image too short");
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&image, &bytes).expect("write process.img");

    let run = common::restore(image.parent().expect("dir"));
    run.assert_error(&["version"]);
    assert!(
        mentions_number(&run.stderr, 99),
        "error should name version 99: {}",
        run.stderr
    );
    assert!(
        !common::pid_exists(pid),
        "a failed restore left process {pid} behind"
    );
}

#[test]
fn restore_refuses_a_pid_in_use_and_leaves_its_owner_alone() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let (wl, region) = start_memory(&mut procs, tmp.path());
    let tids_before = common::tids(wl.pid);
    let img = tmp.path().join("img");
    common::checkpoint(wl.pid, &img, true).assert_ok();

    let run = common::restore(&img);
    run.assert_error(&[]);
    assert!(
        mentions_number(&run.stderr, wl.pid as u64),
        "error should name pid {}: {}",
        wl.pid,
        run.stderr
    );
    let lower = run.stderr.to_lowercase();
    assert!(
        ["in use", "taken", "exist", "busy", "occupied"]
            .iter()
            .any(|w| lower.contains(w)),
        "error should say the pid is in use: {}",
        run.stderr
    );
    common::assert_running_untraced(wl.pid);
    assert_eq!(common::tids(wl.pid), tids_before);
    assert_untouched(&wl, region);
}

#[test]
fn checkpoint_refuses_a_socket_fd_and_leaves_the_process_running() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut procs = Procs::new();
    let wl = procs.workload(WL_SOCKET, &[], tmp.path(), "socket");
    let (_, ready) = wl.out.wait_line(0, "ready ");
    let fd = num(&ready, "fd");
    wl.out.wait_tick_above(2);

    let run = common::checkpoint(wl.pid, &tmp.path().join("img"), false);
    run.assert_error(&["unix datagram socket"]);
    assert!(
        mentions_number(&run.stderr, fd),
        "error should name fd {fd}: {}",
        run.stderr
    );
    common::assert_running_untraced(wl.pid);
    let last = wl.out.last_tick().expect("ticks");
    wl.out.wait_tick_above(last + 3);
    // The socket is still there and still holds its name.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("ferry-wl-socket-{}", wl.pid);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
    let err = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect_err("name still taken");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
}

#[test]
fn restore_from_a_directory_without_an_image_fails() {
    let _serial = common::setup();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = common::restore(tmp.path());
    run.assert_error(&[]);
}
