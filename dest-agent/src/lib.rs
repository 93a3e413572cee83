//! ferry's destination agent: one migration per connection ([`session`]),
//! speaking the wire protocol of [`ferry_protocol::wire`], restoring on a
//! dedicated OS thread per migration ([`restorer`]).

pub mod guard;
pub mod lazy;
pub mod netmove;
pub mod restorer;
pub mod session;
