//! Facts about this host that decide whether an image can run here.

use ferry_protocol::model::HostInfo;

/// Describe this host.
pub fn host_info() -> HostInfo {
    let uts = nix::sys::utsname::uname().ok();
    let s = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uts.as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    HostInfo {
        arch: s(|u| u.machine()),
        kernel: s(|u| u.release()),
        xstate_size: ferry_parasite::xsave::host_xstate_size() as u32,
        xfeatures: ferry_parasite::xsave::host_xfeatures(),
    }
}

/// Why an image taken on `img` cannot be restored on `here`, if it cannot.
pub fn incompatibility(img: &HostInfo, here: &HostInfo) -> Option<String> {
    if img.arch != here.arch {
        return Some(format!(
            "the image is for {}, this host is {}",
            img.arch, here.arch
        ));
    }
    if img.xfeatures & !here.xfeatures != 0 {
        return Some(format!(
            "the process may use CPU state features {:#x} that this host lacks (image XCR0 {:#x}, host {:#x})",
            img.xfeatures & !here.xfeatures,
            img.xfeatures,
            here.xfeatures
        ));
    }
    if img.xstate_size != here.xstate_size {
        return Some(format!(
            "XSAVE area size differs: image {} bytes, host {} bytes",
            img.xstate_size, here.xstate_size
        ));
    }
    if img.kernel != here.kernel {
        return Some(format!(
            "the image was taken on kernel {} and this host runs {}: moving the vDSO between kernels is not supported yet",
            img.kernel, here.kernel
        ));
    }
    None
}
