//! Restoring the mm fields and the executable link with `PR_SET_MM_MAP`.

use crate::error::{Error, Result};
use ferry_parasite::remote::Injector;
use ferry_protocol::model::MmFields;

const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
/// `sizeof(struct prctl_mm_map)`.
const MM_MAP_SIZE: usize = 104;
/// Largest auxv the kernel keeps (`saved_auxv`).
const MAX_AUXV_BYTES: usize = 448;

/// Encode `struct prctl_mm_map`.
fn encode(mm: &MmFields, auxv_addr: u64, auxv_size: u32, exe_fd: u32) -> [u8; MM_MAP_SIZE] {
    let mut b = [0u8; MM_MAP_SIZE];
    let words = [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_addr,
    ];
    for (i, w) in words.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    b[96..100].copy_from_slice(&auxv_size.to_le_bytes());
    b[100..104].copy_from_slice(&exe_fd.to_le_bytes());
    b
}

/// Set the mm fields, auxv and executable of the process driven by `inj`.
/// The old executable must no longer be mapped.
pub fn apply(inj: &mut Injector, mm: &MmFields) -> Result<()> {
    let path = inj.put_cstr(0, &mm.exe_path)?;
    let exe_fd = inj
        .call(
            "openat(executable)",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                path,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
            ],
        )
        .map_err(|e| Error::Incompatible(format!("cannot open executable {}: {e}", mm.exe_path)))?;
    // Keep the auxv up to and including AT_NULL, within the kernel's limit.
    let mut auxv: Vec<u8> = Vec::new();
    for pair in mm.auxv.chunks(2) {
        for w in pair {
            auxv.extend_from_slice(&w.to_le_bytes());
        }
        if pair.first() == Some(&0) {
            break;
        }
    }
    auxv.truncate(MAX_AUXV_BYTES);
    let auxv_addr = inj.put(4096, &auxv)?;
    let map = encode(mm, auxv_addr, auxv.len() as u32, exe_fd as u32);
    let map_addr = inj.put(8192, &map)?;
    let r = inj.call(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, map_addr, MM_MAP_SIZE as u64, 0],
    );
    let _ = inj.call("close", libc::SYS_close, &[exe_fd]);
    r?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn layout() {
        let mm = ferry_protocol::model::MmFields {
            start_code: 1,
            env_end: 11,
            ..Default::default()
        };
        let b = super::encode(&mm, 0xaa, 5, 7);
        assert_eq!(b[0], 1);
        assert_eq!(b[80], 11);
        assert_eq!(b[88], 0xaa);
        assert_eq!(b[96], 5);
        assert_eq!(b[100], 7);
    }
}
