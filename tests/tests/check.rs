//! `migrate check` on the project's machine kind: every required feature is
//! there (exit 0) and the table names what it probed.
mod common;

#[test]
fn check_reports_the_kernel_features() {
    let _serial = common::setup();
    let run = common::migrate(&["check"]);
    run.assert_ok();
    let table = run.stdout.to_lowercase();
    for feature in [
        "ptrace",
        "clone3",
        "set_tid",
        "userfaultfd",
        "pagemap_scan",
        "soft",
        "tcp_repair",
        "pidfd_getfd",
    ] {
        assert!(
            table.contains(feature),
            "`migrate check` does not report {feature}:\n{}",
            run.stdout
        );
    }
}
