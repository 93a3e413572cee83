//! Restore of process-wide state that is not memory, threads or fds:
//! signal dispositions, cwd/root, umask, personality, resource limits,
//! pending signals and, last of all, credentials.
//!
//! Everything that must be done *by* the process is injected into a stopped
//! thread of it through an [`Injector`] whose scratch area belongs to ferry
//! (at least 4096 bytes); resource limits are set from the agent.
//!
//! Which state is shared between threads matters for the order of steps:
//! dispositions (`CLONE_SIGHAND`), cwd/root/umask (`CLONE_FS`) and rlimits
//! (the signal struct) are shared by all threads, personality is inherited
//! at clone time, and credentials are **per thread** (`setresuid(2)` and
//! friends as raw system calls change only the calling thread).
//! So: [`apply`] before the other threads are created, [`queue_signals`]
//! after the threads' signal masks are set, and [`apply_creds`] as the very
//! last step, once in every thread.

use crate::dump::misc::{
    encode_sigaction, parse_creds, prlimit64, read_status_path, RawRlimit, KSIGSET_SIZE, NSIG,
    PR_GET_SECUREBITS,
};
use crate::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::{Credentials, PendingSignal, ProcessMisc, Rlimit, SigAction};

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_VERSION_3: u32 = 0x2008_0522;
const PR_SET_KEEPCAPS: u64 = 8;
const PR_SET_SECUREBITS: u64 = 28;
const PR_SET_DUMPABLE: u64 = 4;
const SECBIT_KEEP_CAPS: u32 = 1 << 4;
const SECBIT_KEEP_CAPS_LOCKED: u32 = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: u32 = 1 << 6;
const PR_CAPBSET_DROP: u64 = 24;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
/// `si_code` of a signal sent with `tkill`/`tgkill`.
const SI_TKILL: i32 = -6;
const SIGINFO_SIZE: usize = ferry_parasite::ptrace::SIGINFO_SIZE;

/// Apply signal dispositions, cwd, root, umask, personality (all injected)
/// and resource limits (from the agent) to the stopped process driven by
/// `inj`. Call it before the process's other threads are created (they
/// inherit the personality). Resource limits never fail the restore: a
/// limit the kernel refuses is logged and applied as closely as allowed.
pub fn apply(inj: &mut Injector, misc: &ProcessMisc) -> Result<()> {
    apply_sigactions(inj, &misc.sigactions)?;

    // chdir first, with the path as seen from our (and the stub's) root,
    // then chroot: the cwd stays where it was put.
    let cwd = inj.put_cstr(0, &misc.cwd)?;
    inj.call("chdir", libc::SYS_chdir, &[cwd])?;
    if misc.root != "/" {
        let root = inj.put_cstr(0, &misc.root)?;
        inj.call("chroot", libc::SYS_chroot, &[root])?;
    }
    inj.call("umask", libc::SYS_umask, &[u64::from(misc.umask & 0o777)])?;
    inj.call(
        "personality",
        libc::SYS_personality,
        &[u64::from(misc.personality)],
    )?;
    apply_rlimits(inj.tid(), &misc.rlimits);
    Ok(())
}

/// Make the process dumpable or not as it was (`PR_SET_DUMPABLE`). After
/// the credentials: a change of user ids resets it to the host's
/// `suid_dumpable`. Mode 2 cannot be set by `prctl`; it is what such a
/// change gives where `suid_dumpable` is 2, and is left to it.
pub fn apply_dumpable(inj: &mut Injector, dumpable: u32) -> Result<()> {
    if dumpable <= 1 {
        inj.call(
            "prctl(PR_SET_DUMPABLE)",
            libc::SYS_prctl,
            &[PR_SET_DUMPABLE, u64::from(dumpable)],
        )?;
    }
    Ok(())
}

/// Set the parent-death signal of the thread driven by `inj`. Only for a
/// process whose parent was restored with it: the root's parent is the
/// restorer, whose exit must not kill it.
pub fn apply_pdeath_signal(inj: &mut Injector, sig: i32) -> Result<()> {
    const PR_SET_PDEATHSIG: u64 = 1;
    if sig != 0 {
        inj.call(
            "prctl(PR_SET_PDEATHSIG)",
            libc::SYS_prctl,
            &[PR_SET_PDEATHSIG, sig as u64],
        )?;
    }
    Ok(())
}

/// Install the dispositions of all signals except SIGKILL/SIGSTOP; signals
/// missing from the image get the default disposition (the stub inherited
/// the agent's handlers, which must not survive).
fn apply_sigactions(inj: &mut Injector, actions: &[SigAction]) -> Result<()> {
    if actions.len() > NSIG as usize {
        return Err(Error::parse(
            "image sigactions",
            format!("{} entries, at most {NSIG} expected", actions.len()),
        ));
    }
    for sig in 1..=NSIG {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let act = actions.get(sig as usize - 1).copied().unwrap_or_default();
        // The saved struct goes back as it was, SA_RESTORER and its
        // restorer address included.
        let addr = inj.put(0, &encode_sigaction(&act))?;
        inj.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sig as u64, addr, 0, KSIGSET_SIZE],
        )?;
    }
    Ok(())
}

/// Set every saved resource limit of process `pid` from the agent.
/// Without CAP_SYS_RESOURCE a hard limit above the current one is refused
/// (EPERM, also for RLIMIT_NOFILE above `fs.nr_open`): the limit is then
/// capped at the current hard limit, with a warning. Never fails.
fn apply_rlimits(pid: i32, rlimits: &[Rlimit]) {
    for rl in rlimits {
        let want = RawRlimit {
            cur: rl.soft,
            max: rl.hard,
        };
        let err = match prlimit64(pid, rl.resource, Some(&want), None) {
            Ok(()) => continue,
            Err(e) => e,
        };
        if err.raw_os_error() != Some(libc::EPERM) {
            tracing::warn!(
                resource = rl.resource,
                soft = rl.soft,
                hard = rl.hard,
                "prlimit64 of process {pid} failed, limit left as it is: {err}"
            );
            continue;
        }
        let mut now = RawRlimit::default();
        if let Err(e) = prlimit64(pid, rl.resource, None, Some(&mut now)) {
            tracing::warn!(
                resource = rl.resource,
                "cannot read rlimit of process {pid} after EPERM, limit left as it is: {e}"
            );
            continue;
        }
        let capped = RawRlimit {
            cur: rl.soft.min(now.max),
            max: rl.hard.min(now.max),
        };
        tracing::warn!(
            resource = rl.resource,
            soft = rl.soft,
            hard = rl.hard,
            capped_soft = capped.cur,
            capped_hard = capped.max,
            "hard limit cannot be raised here (no CAP_SYS_RESOURCE): capped"
        );
        if let Err(e) = prlimit64(pid, rl.resource, Some(&capped), None) {
            tracing::warn!(
                resource = rl.resource,
                "capped prlimit64 of process {pid} failed too, limit left as it is: {e}"
            );
        }
    }
}

/// Re-queue pending signals, with their full `siginfo`, into thread group
/// `tgid`: its shared queue when `tid` is `None` (`rt_sigqueueinfo`), the
/// private queue of thread `tid` otherwise (`rt_tgsigqueueinfo`).
///
/// The calls are injected, so the kernel sees the process signalling
/// itself. It refuses a `siginfo` with `si_code >= 0` (e.g. `SI_USER` from
/// `kill`) or `SI_TKILL` unless the caller's TID equals the target `pid`
/// argument (kernel/signal.c `do_rt_sigqueueinfo`/`do_rt_tgsigqueueinfo`):
/// for the shared queue `inj` must therefore drive the main thread
/// (`tid == tgid`), for a private queue the thread `tid` itself. This is
/// checked here with a clear error; the tests show both work from the
/// right thread. Queue only after the thread's signal mask is restored:
/// a signal that is not blocked is delivered at the next injected step,
/// where the tracer would intercept it and lose its siginfo.
pub fn queue_signals(
    inj: &mut Injector,
    tgid: i32,
    tid: Option<i32>,
    signals: &[PendingSignal],
) -> Result<()> {
    if signals.is_empty() {
        return Ok(());
    }
    let target = tid.unwrap_or(tgid);
    let blocked = inj.tracee().sigmask()?;
    for s in signals {
        if !(1..=NSIG).contains(&s.signo) || s.siginfo.len() != SIGINFO_SIZE {
            return Err(Error::parse(
                "pending signal",
                format!(
                    "signal {} with a {}-byte siginfo ({SIGINFO_SIZE} expected)",
                    s.signo,
                    s.siginfo.len()
                ),
            ));
        }
        let code = i32::from_le_bytes([s.siginfo[8], s.siginfo[9], s.siginfo[10], s.siginfo[11]]);
        if (code >= 0 || code == SI_TKILL) && inj.tid() != target {
            return Err(Error::Unsupported {
                pid: tgid,
                what: format!(
                    "queuing signal {} (si_code {code}) for {target} from thread {}: \
                     the kernel accepts it only from thread {target} itself",
                    s.signo,
                    inj.tid()
                ),
            });
        }
        if blocked & (1u64 << (s.signo - 1)) == 0 {
            tracing::warn!(
                signo = s.signo,
                "re-queued signal is not blocked in thread {}: it may be intercepted \
                 by the tracer before the process runs",
                inj.tid()
            );
        }
        let info = inj.put(0, &s.siginfo)?;
        match tid {
            Some(t) => inj.call(
                "rt_tgsigqueueinfo",
                libc::SYS_rt_tgsigqueueinfo,
                &[tgid as u64, t as u64, s.signo as u64, info],
            )?,
            None => inj.call(
                "rt_sigqueueinfo",
                libc::SYS_rt_sigqueueinfo,
                &[tgid as u64, s.signo as u64, info],
            )?,
        };
    }
    Ok(())
}

/// Give the thread driven by `inj` the saved credentials: supplementary
/// groups, gids, uids (real/effective/saved, then filesystem), the
/// capability sets, the bounding set, ambient capabilities and
/// no_new_privs; then read its /proc status back and fail if anything
/// differs. The last step before the process resumes, once per thread
/// (credentials are per thread). Capabilities that this restorer does not
/// hold itself cannot be given and are refused up front.
pub fn apply_creds(inj: &mut Injector, creds: &Credentials, securebits: u32) -> Result<()> {
    let tid = inj.tid();
    let keep = creds.cap_permitted != 0;
    if securebits & SECBIT_KEEP_CAPS_LOCKED != 0 && securebits & SECBIT_KEEP_CAPS == 0 && keep {
        return Err(Error::Incompatible(
            "the process's securebits lock KEEP_CAPS off, so its capabilities cannot be \
             kept through the change of user ids"
                .into(),
        ));
    }
    if securebits & SECBIT_NO_CAP_AMBIENT_RAISE != 0 && creds.cap_ambient != 0 {
        return Err(Error::Incompatible(
            "the process has ambient capabilities under SECBIT_NO_CAP_AMBIENT_RAISE, \
             which cannot be raised again"
                .into(),
        ));
    }
    let status_path = format!("/proc/{tid}/task/{tid}/status");
    let now = parse_creds(&read_status_path(&status_path, tid)?)?;
    let lacking = creds.cap_permitted & !now.cap_permitted;
    if lacking != 0 {
        return Err(Error::Incompatible(format!(
            "the process had capabilities {lacking:#x} that the restorer does not hold"
        )));
    }
    let lacking = creds.cap_bounding & !now.cap_bounding;
    if lacking != 0 {
        return Err(Error::Incompatible(format!(
            "the process's bounding set has capabilities {lacking:#x} that the restorer's lacks"
        )));
    }
    if now.no_new_privs && !creds.no_new_privs {
        return Err(Error::Incompatible(
            "the restorer runs with no_new_privs, the process did not (it cannot be cleared)"
                .into(),
        ));
    }

    // 1. Supplementary groups (needs CAP_SETGID, still held).
    let mut groups = Vec::with_capacity(creds.groups.len() * 4);
    for g in &creds.groups {
        groups.extend_from_slice(&g.to_le_bytes());
    }
    let addr = inj.put(0, &groups)?;
    inj.call(
        "setgroups",
        libc::SYS_setgroups,
        &[creds.groups.len() as u64, addr],
    )?;

    // 2. Bounding set (PR_CAPBSET_DROP needs CAP_SETPCAP, still effective).
    let last = cap_last_cap()?;
    for cap in 0..=last {
        let bit = 1u64 << cap;
        if now.cap_bounding & bit != 0 && creds.cap_bounding & bit == 0 {
            inj.call(
                "prctl(PR_CAPBSET_DROP)",
                libc::SYS_prctl,
                &[PR_CAPBSET_DROP, u64::from(cap)],
            )?;
        }
    }

    // 3. Group ids, while CAP_SETGID is still effective.
    let [rg, eg, sg, fg] = creds.gids.map(u64::from);
    inj.call("setresgid", libc::SYS_setresgid, &[rg, eg, sg])?;
    // setfsgid returns the previous value, never an error: checked below.
    inj.call_raw(libc::SYS_setfsgid, &[fg])?;

    // 4. User ids. Leaving uid 0 clears the permitted set unless KEEPCAPS is
    //    on, and a non-zero euid clears the effective set; capset below puts
    //    the saved sets back.
    //    The securebits go first (PR_SET_SECUREBITS needs CAP_SETPCAP, still
    //    effective), with KEEP_CAPS on for the change if needed.
    let bits = securebits | if keep { SECBIT_KEEP_CAPS } else { 0 };
    if securebits != 0 {
        inj.call(
            "prctl(PR_SET_SECUREBITS)",
            libc::SYS_prctl,
            &[PR_SET_SECUREBITS, u64::from(bits)],
        )?;
    } else if keep {
        inj.call(
            "prctl(PR_SET_KEEPCAPS)",
            libc::SYS_prctl,
            &[PR_SET_KEEPCAPS, 1],
        )?;
    }
    let [ru, eu, su, fu] = creds.uids.map(u64::from);
    inj.call("setresuid", libc::SYS_setresuid, &[ru, eu, su])?;
    inj.call_raw(libc::SYS_setfsuid, &[fu])?;

    // 5. Capability sets (only lowering from here on).
    let mut cap = [0u8; 40];
    cap[0..4].copy_from_slice(&CAP_VERSION_3.to_le_bytes());
    // pid 0 (self) at 4..8; two data structs {effective, permitted, inheritable} at 8.
    let words = [
        creds.cap_effective as u32,
        creds.cap_permitted as u32,
        creds.cap_inheritable as u32,
        (creds.cap_effective >> 32) as u32,
        (creds.cap_permitted >> 32) as u32,
        (creds.cap_inheritable >> 32) as u32,
    ];
    for (i, w) in words.iter().enumerate() {
        cap[8 + i * 4..12 + i * 4].copy_from_slice(&w.to_le_bytes());
    }
    let hdr = inj.put(0, &cap)?;
    inj.call("capset", libc::SYS_capset, &[hdr, hdr + 8])?;
    if keep && securebits & SECBIT_KEEP_CAPS == 0 {
        inj.call(
            "prctl(PR_SET_KEEPCAPS)",
            libc::SYS_prctl,
            &[PR_SET_KEEPCAPS, 0],
        )?;
    }

    // 6. Ambient set (each cap must be permitted and inheritable: it is now).
    inj.call(
        "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
        libc::SYS_prctl,
        &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0],
    )?;
    for cap in 0..64u64 {
        if creds.cap_ambient & (1 << cap) != 0 {
            inj.call(
                "prctl(PR_CAP_AMBIENT_RAISE)",
                libc::SYS_prctl,
                &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0],
            )?;
        }
    }

    // 7. no_new_privs, which can never be cleared again.
    if creds.no_new_privs {
        inj.call(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            &[PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0],
        )?;
    }

    // 8. Verify.
    let got_bits = inj.call(
        "prctl(PR_GET_SECUREBITS)",
        libc::SYS_prctl,
        &[PR_GET_SECUREBITS],
    )?;
    if got_bits != u64::from(securebits) {
        return Err(Error::Incompatible(format!(
            "securebits of thread {tid} are {got_bits:#x} after restore, the image has {securebits:#x}"
        )));
    }
    let got = parse_creds(&read_status_path(&status_path, tid)?)?;
    let diff = creds_diff(creds, &got);
    if !diff.is_empty() {
        return Err(Error::Incompatible(format!(
            "credentials of thread {tid} differ from the image after restore: {}",
            diff.join("; ")
        )));
    }
    Ok(())
}

/// Human-readable differences between wanted and actual credentials.
fn creds_diff(want: &Credentials, got: &Credentials) -> Vec<String> {
    let mut out = Vec::new();
    if want.uids != got.uids {
        out.push(format!("uids {:?} != {:?}", got.uids, want.uids));
    }
    if want.gids != got.gids {
        out.push(format!("gids {:?} != {:?}", got.gids, want.gids));
    }
    let (mut wg, mut gg) = (want.groups.clone(), got.groups.clone());
    wg.sort_unstable();
    gg.sort_unstable();
    if wg != gg {
        out.push(format!("groups {gg:?} != {wg:?}"));
    }
    let caps = [
        ("inheritable", want.cap_inheritable, got.cap_inheritable),
        ("permitted", want.cap_permitted, got.cap_permitted),
        ("effective", want.cap_effective, got.cap_effective),
        ("bounding", want.cap_bounding, got.cap_bounding),
        ("ambient", want.cap_ambient, got.cap_ambient),
    ];
    for (name, w, g) in caps {
        if w != g {
            out.push(format!("{name} capabilities {g:#x} != {w:#x}"));
        }
    }
    if want.no_new_privs != got.no_new_privs {
        out.push(format!(
            "no_new_privs {} != {}",
            got.no_new_privs, want.no_new_privs
        ));
    }
    out
}

/// The highest capability number this kernel knows.
fn cap_last_cap() -> Result<u32> {
    let path = "/proc/sys/kernel/cap_last_cap";
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {path}"), e))?;
    let v = s.trim();
    let n: u32 = v
        .parse()
        .map_err(|e| Error::parse(path, format!("{v:?}: {e}")))?;
    if n > 63 {
        return Err(Error::parse(path, format!("{n} is above 63")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::misc::{
        decode_sigaction, parse_hex, parse_umask, read_status, KSIGACTION_SIZE,
    };

    use crate::testutil::TempDir;

    const CAP_CHOWN: u32 = 0;
    const CAP_KILL: u32 = 5;
    const CAP_NET_BIND_SERVICE: u32 = 10;
    const SA_SIGINFO: u64 = 4;
    const SA_RESTORER: u64 = 0x0400_0000;
    const SA_RESTART: u64 = 0x1000_0000;
    const NOBODY: u32 = 65534;
    const SI_QUEUE: i32 = -1;
    const SI_USER: i32 = 0;

    fn bit(sig: i32) -> u64 {
        1u64 << (sig - 1)
    }

    /// A stopped stub with a scratch page of ours mapped in it; killed
    /// once `f` returns.
    fn with_stub(f: impl FnOnce(i32, &mut Injector)) {
        crate::testutil::with_stub(false, f);
    }

    fn siginfo(signo: i32, code: i32, pid: i32, value: u64) -> PendingSignal {
        let mut b = vec![0u8; 128];
        b[0..4].copy_from_slice(&signo.to_le_bytes());
        b[8..12].copy_from_slice(&code.to_le_bytes());
        b[16..20].copy_from_slice(&pid.to_le_bytes());
        b[24..32].copy_from_slice(&value.to_le_bytes());
        PendingSignal { signo, siginfo: b }
    }

    /// (soft, hard) of the `label` line of /proc/PID/limits; None = unlimited.
    fn limit(pid: i32, label: &str) -> (Option<u64>, Option<u64>) {
        let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let line = s
            .lines()
            .find(|l| l.starts_with(label))
            .expect("limit line");
        let mut it = line[25..].split_whitespace().map(|v| v.parse::<u64>().ok());
        (it.next().flatten(), it.next().flatten())
    }

    fn own_rlimit(r: u32) -> RawRlimit {
        let mut old = RawRlimit::default();
        prlimit64(0, r, None, Some(&mut old)).expect("prlimit64");
        old
    }

    fn query(inj: &mut Injector, sig: i32) -> SigAction {
        let buf = inj.scratch() + 1024;
        inj.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sig as u64, 0, buf, KSIGSET_SIZE],
        )
        .expect("query");
        decode_sigaction(&inj.get(1024, KSIGACTION_SIZE).expect("get"))
    }

    #[test]
    fn misc_apply_queue_and_creds_on_stub() {
        let dir = TempDir::new("misc-restore");
        let own_nofile = own_rlimit(libc::RLIMIT_NOFILE);
        let own_mq = own_rlimit(libc::RLIMIT_MSGQUEUE);
        let mut sigactions = vec![SigAction::default(); 64];
        let usr1 = SigAction {
            handler: 0x5555_0000_1000,
            flags: SA_RESTART | SA_SIGINFO | SA_RESTORER,
            restorer: 0x5555_0000_2000,
            mask: bit(libc::SIGUSR2) | bit(libc::SIGHUP),
        };
        let rt32 = SigAction {
            handler: 0x5555_0000_3000,
            flags: SA_RESTORER,
            restorer: 0x5555_0000_2000,
            mask: 0,
        };
        sigactions[libc::SIGUSR1 as usize - 1] = usr1;
        sigactions[31] = rt32;
        sigactions[33] = rt32;
        sigactions[libc::SIGPIPE as usize - 1].handler = 1;
        let mq = (own_mq.max.min(1 << 20) / 4, own_mq.max.min(1 << 20) / 2);
        let misc = ProcessMisc {
            creds: Credentials::default(),
            sigactions,
            shared_pending: vec![],
            cwd: dir.path.to_str().expect("utf8").to_string(),
            root: "/".into(),
            umask: 0o027,
            rlimits: vec![
                // Hard limit above ours (and above nr_open): EPERM, capped.
                Rlimit {
                    resource: libc::RLIMIT_NOFILE,
                    soft: 200,
                    hard: u64::MAX,
                },
                // Lowering both is allowed.
                Rlimit {
                    resource: libc::RLIMIT_MSGQUEUE,
                    soft: mq.0,
                    hard: mq.1,
                },
            ],
            personality: libc::ADDR_NO_RANDOMIZE as u32,
            pdeath_signal: libc::SIGTERM,
            dumpable: 1,
            securebits: 0,
        };
        let shared = vec![
            siginfo(libc::SIGUSR2, SI_QUEUE, 4242, 42),
            siginfo(libc::SIGUSR1, SI_USER, 4242, 0),
        ];
        let private = vec![
            siginfo(34, SI_QUEUE, 4243, 1),
            siginfo(34, SI_QUEUE, 4243, 2),
            siginfo(36, SI_TKILL, 4244, 0),
        ];
        with_stub(|pid, inj| {
            apply(inj, &misc).expect("apply");
            apply_pdeath_signal(inj, misc.pdeath_signal).expect("pdeath signal");
            assert_eq!(
                crate::dump::misc::query_pdeath_signal(inj).expect("PR_GET_PDEATHSIG"),
                libc::SIGTERM
            );

            let status = read_status(pid).expect("status");
            assert_eq!(
                parse_hex(&status, "SigCgt").expect("SigCgt"),
                bit(libc::SIGUSR1) | bit(32) | bit(34),
                "{status}"
            );
            assert_eq!(
                parse_hex(&status, "SigIgn").expect("SigIgn"),
                bit(libc::SIGPIPE)
            );
            assert_eq!(query(inj, libc::SIGUSR1), usr1);
            assert_eq!(query(inj, 32), rt32);
            assert_eq!(query(inj, libc::SIGSEGV), SigAction::default());
            assert_eq!(parse_umask(&status).expect("umask"), 0o027);
            assert_eq!(
                std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"),
                dir.path
            );
            assert_eq!(
                std::fs::read_link(format!("/proc/{pid}/root")).expect("root"),
                std::path::PathBuf::from("/")
            );
            let pers = std::fs::read_to_string(format!("/proc/{pid}/personality")).expect("pers");
            assert_eq!(pers.trim(), "00040000");
            assert_eq!(
                limit(pid, "Max open files"),
                (Some(200), Some(own_nofile.max))
            );
            assert_eq!(limit(pid, "Max msgqueue size"), (Some(mq.0), Some(mq.1)));

            // Block what is queued, as the restored threads' masks would.
            let mask = bit(libc::SIGUSR1) | bit(libc::SIGUSR2) | bit(34) | bit(36);
            inj.tracee().set_sigmask(mask).expect("sigmask");
            queue_signals(inj, pid, None, &shared).expect("queue shared");
            queue_signals(inj, pid, Some(pid), &private).expect("queue private");
            let status = read_status(pid).expect("status");
            assert_eq!(
                parse_hex(&status, "ShdPnd").expect("ShdPnd"),
                bit(libc::SIGUSR1) | bit(libc::SIGUSR2)
            );
            assert_eq!(
                parse_hex(&status, "SigPnd").expect("SigPnd"),
                bit(34) | bit(36)
            );
            let got_shared: Vec<Vec<u8>> = inj
                .tracee()
                .pending_signals(true)
                .expect("peek")
                .iter()
                .map(|b| b.to_vec())
                .collect();
            let mut want: Vec<Vec<u8>> = shared.iter().map(|s| s.siginfo.clone()).collect();
            want.sort();
            let mut got = got_shared.clone();
            got.sort();
            assert_eq!(got, want);
            let got_private: Vec<Vec<u8>> = inj
                .tracee()
                .pending_signals(false)
                .expect("peek")
                .iter()
                .map(|b| b.to_vec())
                .collect();
            let want: Vec<Vec<u8>> = private.iter().map(|s| s.siginfo.clone()).collect();
            assert_eq!(got_private, want);
            // A malformed siginfo is refused before anything is queued.
            let bad = PendingSignal {
                signo: 34,
                siginfo: vec![0; 12],
            };
            assert!(queue_signals(inj, pid, None, &[bad]).is_err());
            // From the wrong thread (by TID) si_code >= 0 is refused up front.
            let err = queue_signals(inj, pid, Some(pid + 1), &private[2..]).unwrap_err();
            assert!(err.to_string().contains("itself"), "{err}");

            let creds = Credentials {
                uids: [NOBODY; 4],
                gids: [NOBODY; 4],
                groups: vec![NOBODY],
                cap_bounding: (1 << CAP_CHOWN) | (1 << CAP_KILL),
                no_new_privs: true,
                ..Default::default()
            };
            apply_creds(inj, &creds, 0).expect("apply_creds");
            let status = read_status(pid).expect("status");
            let line = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .unwrap_or_default()
                    .to_string()
            };
            assert_eq!(line("Uid:"), "Uid:\t65534\t65534\t65534\t65534");
            assert_eq!(line("Gid:"), "Gid:\t65534\t65534\t65534\t65534");
            assert_eq!(line("Groups:").trim(), "Groups:\t65534");
            for k in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
                assert_eq!(parse_hex(&status, k).expect("cap"), 0, "{k}");
            }
            assert_eq!(parse_hex(&status, "CapBnd").expect("CapBnd"), 0x21);
            assert_eq!(line("NoNewPrivs:"), "NoNewPrivs:\t1");
            // The process itself now answers as nobody.
            let uid = inj.call("getuid", libc::SYS_getuid, &[]).expect("getuid");
            assert_eq!(uid, u64::from(NOBODY));
        });
    }

    #[test]
    fn misc_rlimit_above_our_hard_limit_is_capped() {
        let guard = crate::testutil::spawn_stub();
        let pid = guard.0;
        let own = own_rlimit(libc::RLIMIT_NOFILE);
        let low = RawRlimit {
            cur: 50,
            max: own.max,
        };
        prlimit64(pid, libc::RLIMIT_NOFILE, Some(&low), None).expect("lower");
        let wanted = [Rlimit {
            resource: libc::RLIMIT_NOFILE,
            soft: own.max + 100,
            hard: u64::MAX,
        }];
        apply_rlimits(pid, &wanted);
        assert_eq!(limit(pid, "Max open files"), (Some(own.max), Some(own.max)));
        // A resource that does not exist is skipped, not fatal.
        apply_rlimits(
            pid,
            &[Rlimit {
                resource: 999,
                soft: 1,
                hard: 1,
            }],
        );
    }

    #[test]
    fn misc_creds_diff_names_every_difference() {
        let want = Credentials {
            uids: [1, 2, 3, 4],
            groups: vec![5, 6],
            cap_bounding: 0xff,
            ..Default::default()
        };
        let mut got = want.clone();
        got.groups = vec![6, 5];
        assert!(
            creds_diff(&want, &got).is_empty(),
            "group order is not a difference"
        );
        got.uids[3] = 9;
        got.cap_bounding = 0x7f;
        got.no_new_privs = true;
        let d = creds_diff(&want, &got);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[1].contains("bounding"), "{d:?}");
    }

    #[test]
    fn misc_creds_keep_caps_as_non_root() {
        with_stub(|pid, inj| {
            let before = parse_creds(&read_status(pid).expect("status")).expect("creds");
            let nbs = 1u64 << CAP_NET_BIND_SERVICE;
            assert_ne!(
                before.cap_permitted & nbs,
                0,
                "test needs CAP_NET_BIND_SERVICE"
            );
            let creds = Credentials {
                // fsuid/fsgid differ from the effective ids (allowed: they
                // equal the real ones), so setfsuid/setfsgid are needed.
                uids: [NOBODY, 1000, NOBODY, NOBODY],
                gids: [NOBODY, 100, NOBODY, NOBODY],
                groups: vec![],
                cap_inheritable: nbs,
                cap_permitted: nbs,
                cap_effective: nbs,
                cap_bounding: before.cap_bounding,
                cap_ambient: nbs,
                no_new_privs: false,
            };
            apply_creds(inj, &creds, 0).expect("apply_creds");
            let got = parse_creds(&read_status(pid).expect("status")).expect("creds");
            assert_eq!(got, creds);
        });
    }

    /// A service of another user with capabilities, NOROOT and
    /// NO_SETUID_FIXUP securebits (one locked) and not dumpable comes back
    /// exactly so; a change of user ids alone would have made it dumpable
    /// as the host's `suid_dumpable` says, and cleared the bits.
    #[test]
    fn misc_securebits_and_dumpable_survive_the_change_of_user() {
        const SECBIT_NOROOT: u32 = 1;
        const SECBIT_NOROOT_LOCKED: u32 = 1 << 1;
        const SECBIT_NO_SETUID_FIXUP: u32 = 1 << 2;
        with_stub(|pid, inj| {
            let before = parse_creds(&read_status(pid).expect("status")).expect("creds");
            let nbs = 1u64 << CAP_NET_BIND_SERVICE;
            let creds = Credentials {
                uids: [NOBODY; 4],
                gids: [NOBODY; 4],
                groups: vec![],
                cap_permitted: nbs,
                cap_effective: nbs,
                cap_bounding: before.cap_bounding,
                ..Default::default()
            };
            let bits = SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP;
            apply_creds(inj, &creds, bits).expect("apply_creds");
            apply_dumpable(inj, 0).expect("dumpable");
            let got = parse_creds(&read_status(pid).expect("status")).expect("creds");
            assert_eq!(got, creds);
            let q = |inj: &mut Injector, op: u64| {
                inj.call("prctl", libc::SYS_prctl, &[op]).expect("prctl")
            };
            assert_eq!(q(inj, PR_GET_SECUREBITS), u64::from(bits));
            assert_eq!(q(inj, 3), 0, "PR_GET_DUMPABLE");
            apply_dumpable(inj, 1).expect("dumpable");
            assert_eq!(q(inj, 3), 1, "PR_GET_DUMPABLE");
        });
        // KEEP_CAPS locked off cannot keep capabilities through setresuid.
        with_stub(|_pid, inj| {
            let creds = Credentials {
                uids: [NOBODY; 4],
                gids: [NOBODY; 4],
                cap_permitted: 1 << CAP_NET_BIND_SERVICE,
                ..Default::default()
            };
            let err = apply_creds(inj, &creds, SECBIT_KEEP_CAPS_LOCKED).unwrap_err();
            assert!(err.to_string().contains("KEEP_CAPS"), "{err}");
        });
    }

    #[test]
    fn misc_creds_refuse_caps_we_lack() {
        with_stub(|pid, inj| {
            let before = parse_creds(&read_status(pid).expect("status")).expect("creds");
            let creds = Credentials {
                uids: [NOBODY; 4],
                gids: [NOBODY; 4],
                cap_permitted: 1 << 63,
                cap_bounding: before.cap_bounding,
                ..Default::default()
            };
            let err = apply_creds(inj, &creds, 0).unwrap_err();
            assert!(matches!(err, Error::Incompatible(_)), "{err}");
            // Refused before anything changed.
            let after = parse_creds(&read_status(pid).expect("status")).expect("creds");
            assert_eq!(after, before);
        });
    }
}
