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

/// An RS256 key file that cannot be used stops the process before anything
/// starts (no database is created), with exit 64 and the file's name.
#[test]
fn an_unusable_rs256_key_file_is_a_config_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("not-a-key.pem");
    std::fs::write(&garbage, "this is not a PEM key").unwrap();
    let missing = dir.path().join("missing.pem");
    for key in [&missing, &garbage] {
        let data = dir.path().join("data");
        let out = Command::new(env!("CARGO_BIN_EXE_clm"))
            .args(["serve", "customer", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("CLM_AUTH__RS256_PUBLIC_KEY_FILE", key)
            .env_remove("CLM_AUTH__HS256_SECRET")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains("auth.rs256_public_key_file"), "{err}");
        assert!(err.contains(&key.display().to_string()), "{err}");
        assert!(!data.exists(), "nothing started: no database was created");
    }
}

/// `clm roles` prints the role tables docs/security.md carries.
#[test]
fn roles_prints_every_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_clm"))
        .args(["roles", "--markdown"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("`clm.customer.v1.CustomerService`"), "{text}");
    assert!(
        text.contains("| CreateCustomer | ✓ | ✓ |   |   |   | ✓ |"),
        "{text}"
    );
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

/// `clm migrate SERVICE` applies the service's migrations and exits; run
/// again it has nothing to do and still succeeds (a pre-deploy Job).
#[test]
fn migrate_applies_a_services_migrations_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_clm"))
            .args(["migrate", "loyalty", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("loyalty: migrations applied"), "{text}");
    }
    let db = dir.path().join("loyalty.db");
    assert!(
        db.is_file(),
        "the service's SQLite database was created and migrated"
    );
    let tables = Command::new("python3")
        .args(["-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT COUNT(*) FROM seaql_migrations\").fetchone()[0])"])
        .arg(&db)
        .output()
        .unwrap();
    let applied: i64 = String::from_utf8_lossy(&tables.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(applied > 5, "{applied} migrations recorded");
}
