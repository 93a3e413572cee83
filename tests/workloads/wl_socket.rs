//! wl-socket: holds a UDP socket bound on 127.0.0.1 (a kind of fd that
//! checkpoint does not support yet), prints `ready pid=P fd=N port=X`, then
//! ticks every 20 ms.
mod shared;

use shared::{die, say};
use std::os::fd::AsRawFd;
use std::time::Duration;

fn main() {
    let listener = match std::net::UdpSocket::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => die(&format!("bind: {e}")),
    };
    let port = match listener.local_addr() {
        Ok(a) => a.port(),
        Err(e) => die(&format!("local_addr: {e}")),
    };
    say(&format!(
        "ready pid={} fd={} port={port}",
        std::process::id(),
        listener.as_raw_fd()
    ));
    for tick in 1u64.. {
        say(&format!("tick {tick}"));
        std::thread::sleep(Duration::from_millis(20));
    }
}
