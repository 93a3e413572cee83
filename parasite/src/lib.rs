//! ptrace control and remote system calls.
