//! The `clm` command line: one table of services for `up` and `serve`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn up_print_config_prints_every_service_with_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["up", "--print-config", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("# clm customer"), "{text}");
    assert!(text.contains("[peers]"), "{text}");
    assert!(
        text.contains("customer = \"http://127.0.0.1:50051\""),
        "up fills in every peer: {text}"
    );
}

#[test]
fn serve_refuses_an_unknown_service() {
    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "billing"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown service \"billing\""), "{err}");
    assert!(err.contains("customer"), "{err}");
}

#[test]
fn a_bad_peer_is_a_config_error_with_exit_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args([
            "serve",
            "customer",
            "--peer",
            "customer=ftp://x",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peers.customer"));
}

#[test]
fn the_erased_identifier_policy_is_checked_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "customer", "--print-config"])
        .env("CLM_CUSTOMER__ERASED_IDENTIFIER_POLICY", "maybe")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("customer.erased_identifier_policy"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["serve", "customer", "--print-config"])
        .env("CLM_CUSTOMER__ERASED_IDENTIFIER_POLICY", "flag")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[customer]\nerased_identifier_policy = \"flag\""),
        "{text}"
    );
}
