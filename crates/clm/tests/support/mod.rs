//! What the `clm` binary's process tests share: a server started on port 0
//! whose address is read from its output, restartable and killable.
// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::{TestBackend, wait_serving};
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Spawns `cmd` with its stdout piped and returns the address `service`
/// reports in its `<service> listening on ADDR` line (servers are started
/// on port 0, so the port is the one the server actually bound: no race
/// for a free port). The rest of stdout is drained in the background so
/// the child never blocks or fails on a full or closed pipe.
pub fn spawn_and_read_address(cmd: &mut Command, service: &str) -> (Child, SocketAddr) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn clm");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = format!("{service} ");
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(rest) = line.strip_prefix(&prefix)
                && let Some(addr) = rest.trim_start().strip_prefix("listening on ")
                && let Some(tx) = tx.take()
            {
                let addr = addr.split_whitespace().next().unwrap_or_default();
                let _ = tx.send(addr.parse::<SocketAddr>());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server exited or printed no address (its stderr is above)")
        .expect("a socket address");
    (child, addr)
}

/// `clm serve customer` on one database, restartable (each start binds a
/// new port 0 and reads the address it got).
pub struct Server {
    pub addr: SocketAddr,
    database_url: String,
    data_dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Server {
    pub async fn start(backend: &TestBackend) -> Self {
        let mut s = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: backend.database_url.clone(),
            data_dir: backend.dir().to_owned(),
            child: None,
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn restart(&mut self) {
        let (child, addr) = spawn_and_read_address(
            Command::new(env!("CARGO_BIN_EXE_clm"))
                .args([
                    "serve",
                    "customer",
                    "--listen",
                    "127.0.0.1:0",
                    "--database-url",
                    &self.database_url,
                ])
                .arg("--data-dir")
                .arg(&self.data_dir)
                .env("RUST_LOG", "warn")
                .env("CLM_DRAIN_TIMEOUT_SECS", "60"),
            "customer",
        );
        self.addr = addr;
        self.child = Some(child);
        wait_serving(&self.url()).await;
    }

    /// SIGKILL: no chance to flush or drain.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for the graceful exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "graceful shutdown exits 0, got {status:?}"
            );
        }
    }

    pub fn client(&self) -> CustomerServiceClient<tonic::transport::Channel> {
        CustomerServiceClient::new(clm_platform::client::channel(&self.url()).unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
