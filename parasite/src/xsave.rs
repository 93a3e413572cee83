//! Facts about this CPU's XSAVE state.

/// Size in bytes of the XSAVE area the kernel uses (CPUID 0xD,0 EBX), which
/// is what `NT_X86_XSTATE` returns.
pub fn host_xstate_size() -> usize {
    let r = std::arch::x86_64::__cpuid_count(0xd, 0);
    r.ebx as usize
}

/// XCR0: the XSAVE features enabled by the kernel.
pub fn host_xfeatures() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: xgetbv with ecx=0 reads XCR0; the kernel enables OSXSAVE on
    // every x86-64 machine that has XSAVE, which this code requires.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    ((hi as u64) << 32) | lo as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_plausible() {
        let size = super::host_xstate_size();
        assert!((576..=1 << 20).contains(&size), "{size}");
        // x87 and SSE are always enabled.
        assert_eq!(super::host_xfeatures() & 3, 3);
    }
}
