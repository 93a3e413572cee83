//! wl-socket: holds a unix datagram socket bound to the abstract name
//! `ferry-wl-socket-PID` with a datagram carrying a file descriptor
//! (`SCM_RIGHTS`) queued on it, which checkpoint refuses; prints
//! `ready pid=P fd=N`, then ticks every 20 ms.
mod shared;

use shared::{die, say};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

fn main() {
    let name = format!("ferry-wl-socket-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes())
        .unwrap_or_else(|e| die(&format!("abstract name: {e}")));
    let sock = UnixDatagram::bind_addr(&addr).unwrap_or_else(|e| die(&format!("bind: {e}")));
    let to_self = UnixDatagram::unbound().unwrap_or_else(|e| die(&format!("socket: {e}")));
    to_self
        .connect_addr(&addr)
        .unwrap_or_else(|e| die(&format!("connect: {e}")));
    if !shared::send_fd_in_flight(to_self.as_raw_fd(), 0) {
        die("sendmsg(SCM_RIGHTS)");
    }
    drop(to_self);
    say(&format!(
        "ready pid={} fd={}",
        std::process::id(),
        sock.as_raw_fd()
    ));
    for tick in 1u64.. {
        say(&format!("tick {tick}"));
        std::thread::sleep(Duration::from_millis(20));
    }
}
