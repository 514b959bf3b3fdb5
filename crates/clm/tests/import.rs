//! `clm import` as a user runs it, against a real customer service
//! (`clm serve customer`, SQLite or PostgreSQL when `CLM_TEST_DATABASE_URL`
//! is set): 100,000 rows with bad ones among them, the import killed
//! halfway and resumed, then run again from scratch, ends with exactly the
//! good rows, once, and exactly the bad rows in the rejects file, once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clm_platform::testing::TestBackend;
use clm_proto::customer as pb;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::Server;

const ROWS: u64 = 100_000;
/// Held by a customer created before the import.
const TAKEN: &str = "taken@example.com";

/// Why row `i` is bad, if it is.
fn bad(i: u64) -> Option<&'static str> {
    if i % 1000 == 500 {
        Some("columns") // a row with one column too many: unreadable
    } else if i.is_multiple_of(97) {
        Some("email") // refused by the service (INVALID_ARGUMENT)
    } else if i.is_multiple_of(89) {
        Some("date") // refused before sending
    } else if i.is_multiple_of(4999) {
        Some("taken") // an e-mail the service already holds: ALREADY_EXISTS
    } else {
        None
    }
}

/// Odd rows carry an e-mail, even ones only a name: those have nothing the
/// service could refuse as a duplicate, so only the per-row idempotency of
/// the import keeps them from being created twice.
fn write_file(path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "email,display_name,birth_date,attributes.plan").unwrap();
    for i in 1..=ROWS {
        let email = if i % 2 == 1 {
            format!("u{i}@example.com")
        } else {
            String::new()
        };
        let line = match bad(i) {
            Some("columns") => format!("{email},Row {i},1990-01-01,pro,extra"),
            Some("email") => format!("not-an-email-{i},Row {i},1990-01-01,pro"),
            Some("date") => format!("{email},Row {i},1990-13-01,pro"),
            Some(_) => format!("{TAKEN},Row {i},1990-01-01,pro"),
            None => format!("{email},Row {i},1990-01-{:02},free", i % 28 + 1),
        };
        writeln!(f, "{line}").unwrap();
    }
}

fn import(server: &Server, file: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clm"));
    cmd.args(["import", "customers"])
        .arg(file)
        .args(["--customer-url", &server.url(), "--batch-size", "1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run(cmd: &mut Command) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "clm import failed: {status:?}\n{out}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    out
}

/// Every customer's display name, paging through ListCustomers.
async fn names(server: &Server) -> Vec<String> {
    let mut client = server.client();
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_customers(pb::ListCustomersRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(page.customers.into_iter().map(|c| c.display_name));
        if page.next_page_token.is_empty() {
            return names;
        }
        page_token = page.next_page_token;
    }
}

fn rows_done(checkpoint: &Path) -> u64 {
    std::fs::read(checkpoint)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["rows_done"].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_100k_row_import_resumes_and_ends_with_the_good_rows_once() {
    let backend = TestBackend::new().await;
    let server = Server::start(&backend).await;
    server
        .client()
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                email: TAKEN.into(),
                display_name: "Already here".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("customers.csv");
    write_file(&file);
    let checkpoint = dir.path().join("customers.csv.checkpoint");
    let rejects = dir.path().join("customers.csv.rejected.csv");

    // Kill the first run (SIGKILL: no chance to tidy up) a third of the way in.
    let mut first = import(&server, &file).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while rows_done(&checkpoint) < ROWS / 3 {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended before it was interrupted"
        );
        assert!(Instant::now() < deadline, "the first run made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let stopped_at = rows_done(&checkpoint);
    assert!(stopped_at < ROWS, "stopped before the end ({stopped_at})");

    let resumed = run(&mut import(&server, &file));
    let good: BTreeSet<String> = (1..=ROWS)
        .filter(|&i| bad(i).is_none())
        .map(|i| format!("Row {i}"))
        .chain(["Already here".to_owned()])
        .collect();
    let bad_rows: Vec<u64> = (1..=ROWS).filter(|&i| bad(i).is_some()).collect();
    assert!(
        resumed.contains(&format!("{ROWS} rows: "))
            && resumed.contains(&format!("{} rejected", bad_rows.len())),
        "{resumed}"
    );

    let check = |names: Vec<String>| {
        let unique: BTreeSet<String> = names.iter().cloned().collect();
        assert_eq!(names.len(), unique.len(), "a row was created twice");
        assert_eq!(unique, good, "exactly the good rows");
    };
    check(names(&server).await);
    let mut reader = csv::Reader::from_path(&rejects).unwrap();
    let rejected: Vec<u64> = reader
        .records()
        .map(|r| r.unwrap()[0].parse().unwrap())
        .collect();
    assert_eq!(rejected, bad_rows, "exactly the bad rows, once, in order");

    // A re-run of the whole file from scratch creates nothing.
    std::fs::remove_file(&checkpoint).unwrap();
    let again = run(&mut import(&server, &file));
    assert!(again.contains(": 0 imported"), "{again}");
    check(names(&server).await);
}
