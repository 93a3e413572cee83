//! Checkpoint of the mm fields (`PR_SET_MM_MAP` values) and the executable.

use crate::error::{Error, Result};
use crate::procfs;
use ferry_parasite::remote::Injector;
use ferry_protocol::model::MmFields;

/// Read the mm fields of `pid`; `inj` drives its frozen main thread (for
/// `brk(0)`, which /proc does not show).
pub fn collect(pid: i32, inj: &mut Injector) -> Result<MmFields> {
    let st = procfs::stat(pid)?;
    let auxv_bytes = std::fs::read(format!("/proc/{pid}/auxv"))
        .map_err(|e| Error::io(format!("read /proc/{pid}/auxv"), e))?;
    let auxv = auxv_bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let brk = inj.call("brk(0)", libc::SYS_brk, &[0])?;
    let exe_path = procfs::link(pid, "exe")?;
    if exe_path.ends_with(" (deleted)") {
        return Err(Error::Unsupported {
            pid,
            what: format!("a deleted executable ({exe_path})"),
        });
    }
    Ok(MmFields {
        start_code: st.field(26)?,
        end_code: st.field(27)?,
        start_stack: st.field(28)?,
        start_data: st.field(45)?,
        end_data: st.field(46)?,
        start_brk: st.field(47)?,
        brk,
        arg_start: st.field(48)?,
        arg_end: st.field(49)?,
        env_start: st.field(50)?,
        env_end: st.field(51)?,
        auxv,
        exe_path,
    })
}
