//! Reading and writing another process's memory.

use crate::error::{Error, Result};
use libc::{c_void, iovec};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;

/// Most iovecs the kernel takes in one call.
const IOV_MAX: usize = 1024;

/// Read `buf.len()` bytes at `addr` of `pid` with `process_vm_readv`
/// (only readable memory).
pub fn read(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let local = [iovec {
        iov_base: buf.as_mut_ptr() as *mut c_void,
        iov_len: buf.len(),
    }];
    let remote = [iovec {
        iov_base: addr as *mut c_void,
        iov_len: buf.len(),
    }];
    let n = vm_readv(pid, &local, &remote)?;
    if n != buf.len() {
        return Err(short(pid, "process_vm_readv", addr, n, buf.len()));
    }
    Ok(())
}

/// Write `data` at `addr` of `pid` with `process_vm_writev` (only writable memory).
pub fn write(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    write_many(pid, &[(addr, data)])
}

/// Write many `(addr, data)` pieces with as few `process_vm_writev` calls as possible.
pub fn write_many(pid: i32, pieces: &[(u64, &[u8])]) -> Result<()> {
    for chunk in pieces.chunks(IOV_MAX) {
        let local: Vec<iovec> = chunk
            .iter()
            .map(|(_, d)| iovec {
                iov_base: d.as_ptr() as *mut c_void,
                iov_len: d.len(),
            })
            .collect();
        let remote: Vec<iovec> = chunk
            .iter()
            .map(|(a, d)| iovec {
                iov_base: *a as *mut c_void,
                iov_len: d.len(),
            })
            .collect();
        let want: usize = chunk.iter().map(|(_, d)| d.len()).sum();
        let n = vm_writev(pid, &local, &remote)?;
        if n != want {
            // Partial: finish piece by piece to name the failing address.
            let mut done = 0usize;
            for (a, d) in chunk {
                if done + d.len() <= n {
                    done += d.len();
                    continue;
                }
                let skip = n.saturating_sub(done).min(d.len());
                let rest = &d[skip..];
                let r = vm_writev(
                    pid,
                    &[iovec {
                        iov_base: rest.as_ptr() as *mut c_void,
                        iov_len: rest.len(),
                    }],
                    &[iovec {
                        iov_base: (a + skip as u64) as *mut c_void,
                        iov_len: rest.len(),
                    }],
                )?;
                if r != rest.len() {
                    return Err(short(pid, "process_vm_writev", *a, r, d.len()));
                }
                done += d.len();
            }
        }
    }
    Ok(())
}

/// Read through `/proc/PID/mem`: works on any mapped memory, even without
/// read permission (the kernel forces access for a tracer).
pub fn read_forced(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let f = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| Error::sys("open /proc/PID/mem", pid, e))?;
    f.read_exact_at(buf, addr)
        .map_err(|e| Error::sys(&format!("read /proc/{pid}/mem at {addr:#x}"), pid, e))
}

/// Write through `/proc/PID/mem`: works even on read-only or executable
/// mappings (copy-on-write).
pub fn write_forced(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| Error::sys("open /proc/PID/mem", pid, e))?;
    f.write_all_at(data, addr)
        .map_err(|e| Error::sys(&format!("write /proc/{pid}/mem at {addr:#x}"), pid, e))
}

fn short(pid: i32, what: &str, addr: u64, got: usize, want: usize) -> Error {
    Error::sys(
        &format!("{what} at {addr:#x} ({got} of {want} bytes)"),
        pid,
        io::Error::from_raw_os_error(libc::EFAULT),
    )
}

fn vm_readv(pid: i32, local: &[iovec], remote: &[iovec]) -> Result<usize> {
    // SAFETY: the local iovecs point into buffers we own for their full
    // length; the remote ones are only addresses in the other process.
    let n = unsafe {
        libc::process_vm_readv(
            pid,
            local.as_ptr(),
            local.len() as _,
            remote.as_ptr(),
            remote.len() as _,
            0,
        )
    };
    if n < 0 {
        return Err(Error::sys(
            "process_vm_readv",
            pid,
            io::Error::last_os_error(),
        ));
    }
    Ok(n as usize)
}

fn vm_writev(pid: i32, local: &[iovec], remote: &[iovec]) -> Result<usize> {
    // SAFETY: the local iovecs point into live buffers for their full length;
    // the remote ones are only addresses in the other process.
    let n = unsafe {
        libc::process_vm_writev(
            pid,
            local.as_ptr(),
            local.len() as _,
            remote.as_ptr(),
            remote.len() as _,
            0,
        )
    };
    if n < 0 {
        return Err(Error::sys(
            "process_vm_writev",
            pid,
            io::Error::last_os_error(),
        ));
    }
    Ok(n as usize)
}
