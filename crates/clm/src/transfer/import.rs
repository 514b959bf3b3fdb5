//! `clm import customers|touchpoints FILE`: streams a CSV or JSON Lines file
//! into a running CLM through the public gRPC API, in batches.
//!
//! * **Idempotent per row.** Every batch carries a key derived from its
//!   rows' numbers and contents (BatchCreateCustomers' `request_id`; a
//!   touchpoint's `event_id` when the row has none), so sending a batch
//!   again (a retry, a resumed run, a re-run of the same file) creates
//!   nothing twice: the service answers the first result.
//! * **Resumable.** After each batch, in file order, `FILE.checkpoint`
//!   records the rows done; a run finding one skips them. A batch in flight
//!   when the run stopped is sent again with the same key.
//! * **Rejected rows** go to `FILE.rejected.csv` (row number, reason, the
//!   row as read), never stopping the import: a row the file cannot express
//!   is refused here; one the service refuses is isolated (bad input by the
//!   index the service names, anything else by halving the batch until the
//!   row is alone: see `split_refused`) and its reason is the service's.
//! * Progress: a bar on a terminal, a line every 5 s otherwise; a summary.

use super::Connection;
use super::convert::{self, CustomerRef};
use super::progress::Progress;
use super::rows::{Format, Mapping, Reader, Row};
use anyhow::{Context, bail};
use clm_proto::clm::customer::v1::{
    BatchCreateCustomersRequest, BatchLookupCustomersRequest, CreateCustomerRequest,
    RecordTouchpointsRequest, Touchpoint,
};
use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Customers,
    Touchpoints,
}

/// The options of one import.
#[derive(Debug, Clone)]
pub struct Options {
    pub kind: Kind,
    pub file: PathBuf,
    pub format: Option<Format>,
    pub mapping: Option<PathBuf>,
    pub batch_size: usize,
    pub concurrency: usize,
}

/// What an import did, also kept in the checkpoint.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Data rows read (accepted or rejected).
    pub rows: u64,
    /// Customers created / touchpoints recorded.
    pub imported: u64,
    /// Rows the service already had (a touchpoint already recorded; a
    /// customer batch answered from an earlier run).
    pub already_there: u64,
    /// Rows written to the rejects file.
    pub rejected: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    kind: Kind,
    /// SHA-256 of the whole input: a checkpoint of another file is refused.
    file_sha256: String,
    batch_size: usize,
    /// Rows (by number) done, in order.
    rows_done: u64,
    /// Input offset after the last row done.
    offset: u64,
    /// Length of the rejects file when the checkpoint was written.
    rejects_len: u64,
    counts: Counts,
    complete: bool,
}

/// A batch as read: rows to send, and rows already rejected (unreadable, or
/// a value the API cannot take), in file order.
struct Batch {
    send: Vec<(Row, Payload)>,
    rejected: Vec<(Row, String)>,
    last_row: u64,
    end_offset: u64,
}

enum Payload {
    Customer(CreateCustomerRequest),
    Touchpoint(CustomerRef, Touchpoint),
}

struct Outcome {
    imported: u64,
    already_there: u64,
    rejected: Vec<(Row, String)>,
}

/// Runs one import; the summary is printed and returned.
pub async fn run(conn: &Connection, opts: &Options) -> anyhow::Result<Counts> {
    if !(1..=1000).contains(&opts.batch_size) {
        bail!("--batch-size must be 1..1000");
    }
    let format = Format::of(&opts.file, opts.format);
    let mapping = Mapping::load(opts.mapping.as_deref())?;
    let known = match opts.kind {
        Kind::Customers => convert::is_customer_field,
        Kind::Touchpoints => convert::is_touchpoint_field,
    };
    mapping.check(&Reader::columns(&opts.file, format)?, known)?;
    let checkpoint_path = beside(&opts.file, "checkpoint");
    let rejects_path = beside(&opts.file, "rejected.csv");
    let file_sha256 = sha256_of(&opts.file)?;

    let mut checkpoint = match read_checkpoint(&checkpoint_path)? {
        Some(c) if c.file_sha256 != file_sha256 || c.kind != opts.kind => bail!(
            "{} belongs to another file or kind of import; delete it to start over",
            checkpoint_path.display()
        ),
        Some(c) if c.complete => {
            eprintln!(
                "{} was imported completely (per {}); delete the checkpoint to send it again \
                 (nothing would be created twice)",
                opts.file.display(),
                checkpoint_path.display()
            );
            print_summary(&c.counts, &rejects_path, 0.0, Duration::ZERO);
            return Ok(c.counts);
        }
        Some(c) => {
            eprintln!(
                "resuming {} after row {} ({})",
                opts.file.display(),
                c.rows_done,
                checkpoint_path.display()
            );
            c
        }
        None => Checkpoint {
            kind: opts.kind,
            file_sha256,
            batch_size: opts.batch_size,
            rows_done: 0,
            offset: 0,
            rejects_len: 0,
            counts: Counts::default(),
            complete: false,
        },
    };
    // Same batches as the stopped run, so a batch it had in flight is sent
    // again with the same key.
    let batch_size = checkpoint.batch_size;
    let mut rejects = open_rejects(&rejects_path, checkpoint.rejects_len)?;

    let reader = Reader::open(&opts.file, format, mapping)?;
    let mut progress = Progress::new(
        "import",
        Some(reader.total_bytes),
        checkpoint.offset,
        checkpoint.counts.rows,
    );
    let batches = Batches {
        reader,
        kind: opts.kind,
        skip_through: checkpoint.rows_done,
        size: batch_size,
    };
    let kind = opts.kind;
    let mut results =
        stream::iter(batches.map(|b| send(conn, kind, b))).buffered(opts.concurrency.max(1));
    while let Some(result) = results.next().await {
        let (batch, outcome) = result?;
        for (row, reason) in &outcome.rejected {
            write_reject(&mut rejects, row, reason)?;
        }
        rejects.flush()?;
        let c = &mut checkpoint.counts;
        c.rows += batch.last_row - checkpoint.rows_done;
        c.imported += outcome.imported;
        c.already_there += outcome.already_there;
        c.rejected += outcome.rejected.len() as u64;
        checkpoint.rows_done = batch.last_row;
        checkpoint.offset = batch.end_offset;
        checkpoint.rejects_len = rejects.get_ref().metadata()?.len();
        write_checkpoint(&checkpoint_path, &checkpoint)?;
        progress.set(checkpoint.offset, checkpoint.counts.rows);
    }
    checkpoint.complete = true;
    write_checkpoint(&checkpoint_path, &checkpoint)?;
    progress.finish();
    print_summary(
        &checkpoint.counts,
        &rejects_path,
        progress.rate(),
        progress.elapsed(),
    );
    Ok(checkpoint.counts)
}

fn print_summary(c: &Counts, rejects: &Path, rate: f64, elapsed: Duration) {
    println!(
        "{} rows: {} imported, {} already there, {} rejected{} in {:.1} s ({:.0} rows/s)",
        c.rows,
        c.imported,
        c.already_there,
        c.rejected,
        if c.rejected > 0 {
            format!(" (see {})", rejects.display())
        } else {
            String::new()
        },
        elapsed.as_secs_f64(),
        rate
    );
}

/// `FILE.<suffix>` beside the input.
pub fn beside(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_checkpoint(path: &Path) -> anyhow::Result<Option<Checkpoint>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a checkpoint; delete it to start over",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Written whole to a temporary file and renamed over the old one: a stop
/// at any instant leaves the old checkpoint or the new one.
fn write_checkpoint(path: &Path, c: &Checkpoint) -> anyhow::Result<()> {
    let tmp = beside(path, "tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(c)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The rejects file, cut back to what the checkpoint counted (rows a
/// stopped run rejected after its last checkpoint are rejected again).
fn open_rejects(path: &Path, len: u64) -> anyhow::Result<csv::Writer<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.set_len(len)?;
    let mut file = file;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(file);
    if len == 0 {
        writer.write_record(["row", "reason", "record"])?;
    }
    Ok(writer)
}

fn write_reject(w: &mut csv::Writer<File>, row: &Row, reason: &str) -> anyhow::Result<()> {
    w.write_record([
        row.number.to_string().as_str(),
        reason,
        row.original.as_str(),
    ])?;
    Ok(())
}

/// Batches of `size` rows to send (plus the rows rejected among them),
/// after the rows a checkpoint says are done.
struct Batches {
    reader: Reader,
    kind: Kind,
    skip_through: u64,
    size: usize,
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let mut batch = Batch {
            send: Vec::new(),
            rejected: Vec::new(),
            last_row: 0,
            end_offset: 0,
        };
        while batch.send.len() < self.size {
            let Some(item) = self.reader.next() else {
                break;
            };
            let (row, outcome) = match item {
                Err(unreadable) => (unreadable.row, Err(unreadable.reason)),
                Ok(row) => {
                    let payload = payload(self.kind, &row);
                    (row, payload)
                }
            };
            if row.number <= self.skip_through {
                continue;
            }
            batch.last_row = row.number;
            batch.end_offset = row.end_offset;
            match outcome {
                Ok(p) => batch.send.push((row, p)),
                Err(reason) => batch.rejected.push((row, reason)),
            }
        }
        (batch.last_row > 0).then_some(batch)
    }
}

fn payload(kind: Kind, row: &Row) -> Result<Payload, String> {
    match kind {
        Kind::Customers => convert::customer(row).map(Payload::Customer),
        Kind::Touchpoints => {
            let derived = format!(
                "import-{}",
                &key("touchpoint", std::slice::from_ref(row))[..32]
            );
            convert::touchpoint(row, derived).map(|(who, t)| Payload::Touchpoint(who, t))
        }
    }
}

/// The idempotency key of some rows: their numbers and contents.
fn key(kind: &str, rows: &[Row]) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    for r in rows {
        h.update(r.number.to_be_bytes());
        h.update(r.canonical().as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

async fn send(conn: &Connection, kind: Kind, mut batch: Batch) -> anyhow::Result<(Batch, Outcome)> {
    let rows = std::mem::take(&mut batch.send);
    let mut outcome = match kind {
        Kind::Customers => send_customers(conn, rows).await?,
        Kind::Touchpoints => send_touchpoints(conn, rows).await?,
    };
    outcome.rejected.append(&mut batch.rejected);
    outcome.rejected.sort_by_key(|(r, _)| r.number);
    Ok((batch, outcome))
}

/// A refusal that is about the rows (reject them), not about the call
/// (retry or stop).
fn about_the_rows(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition | Code::NotFound
    )
}

/// The rows an INVALID_ARGUMENT names, by index into what was sent
/// (`requests[3]`, `touchpoints[7]` in its BadRequest fields), with the
/// reasons.
fn named_rows(status: &Status, list: &str, len: usize) -> HashMap<usize, String> {
    let mut named: HashMap<usize, String> = HashMap::new();
    let mut note = |i: usize, reason: String| {
        if i < len {
            named
                .entry(i)
                .and_modify(|r| {
                    r.push_str("; ");
                    r.push_str(&reason);
                })
                .or_insert(reason);
        }
    };
    if let Some(bad) = status.get_details_bad_request() {
        for v in bad.field_violations {
            if let Some(i) = index_in(&v.field, list) {
                note(i, format!("{}: {}", v.field, v.description));
            }
        }
    }
    named
}

/// `i` of the first `list[i]` in `text`.
fn index_in(text: &str, list: &str) -> Option<usize> {
    let start = text.find(&format!("{list}["))? + list.len() + 1;
    let end = text[start..].find(']')? + start;
    text[start..end].parse().ok()
}

/// Calls `f` until it answers something other than a transient failure
/// (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED), with
/// backoff, for about a minute.
async fn with_retries<T, F, Fut>(mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut delay = Duration::from_millis(100);
    for _ in 0..12 {
        match f().await {
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::ResourceExhausted
                        | Code::Aborted
                ) =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            other => return other,
        }
    }
    f().await
}

async fn send_customers(conn: &Connection, rows: Vec<(Row, Payload)>) -> anyhow::Result<Outcome> {
    let mut out = Outcome {
        imported: 0,
        already_there: 0,
        rejected: Vec::new(),
    };
    // By the client's clock: the same as the service's on one machine.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default();
    let mut work = vec![rows];
    while let Some(part) = work.pop() {
        if part.is_empty() {
            continue;
        }
        let only_rows: Vec<Row> = part.iter().map(|(r, _)| r.clone()).collect();
        let request = BatchCreateCustomersRequest {
            requests: part
                .iter()
                .filter_map(|(_, p)| match p {
                    Payload::Customer(c) => Some(c.clone()),
                    Payload::Touchpoint(..) => None,
                })
                .collect(),
            request_id: format!("clm-import-{}", &key("customers", &only_rows)[..40]),
        };
        let answer = with_retries(|| {
            let mut client = conn.customers();
            let request = request.clone();
            async move { client.batch_create_customers(request).await }
        })
        .await;
        match answer {
            Ok(answer) => {
                // A batch answered from an earlier run holds customers
                // created before this run started.
                for c in answer.into_inner().customers {
                    let micros = |t: prost_types::Timestamp| {
                        t.seconds * 1_000_000 + i64::from(t.nanos / 1000)
                    };
                    if c.create_time.is_some_and(|t| micros(t) < started) {
                        out.already_there += 1;
                    } else {
                        out.imported += 1;
                    }
                }
            }
            Err(status) if about_the_rows(status.code()) => {
                split_refused(status, "requests", part, &mut work, &mut out.rejected);
            }
            Err(status) => bail!("BatchCreateCustomers: {status}"),
        }
    }
    Ok(out)
}

/// After a refusal of `part`: reject the rows an INVALID_ARGUMENT names
/// and send the rest again; after any other refusal, or one naming no row,
/// halve the part (a lone row is rejected).
///
/// Only bad input is taken row by row: it depends on the rows alone, so a
/// re-run splits the batch the same way and sends the same parts under the
/// same keys, which the service answers from the first run. A refusal that
/// depends on what the service holds (an identifier taken, by this very
/// import too) would name other rows on a re-run; halving does not depend
/// on which row is named, so every part that succeeded once is sent again
/// unchanged (and answered, not created again), and every part refused
/// once is refused again.
fn split_refused(
    status: Status,
    list: &str,
    part: Vec<(Row, Payload)>,
    work: &mut Vec<Vec<(Row, Payload)>>,
    rejected: &mut Vec<(Row, String)>,
) {
    let named = if status.code() == Code::InvalidArgument {
        named_rows(&status, list, part.len())
    } else {
        HashMap::new()
    };
    if !named.is_empty() {
        let mut rest = Vec::new();
        for (i, item) in part.into_iter().enumerate() {
            match named.get(&i) {
                Some(reason) => rejected.push((item.0, reason.clone())),
                None => rest.push(item),
            }
        }
        work.push(rest);
    } else if part.len() == 1 {
        let reason = format!("{:?}: {}", status.code(), status.message());
        rejected.extend(part.into_iter().map(|(row, _)| (row, reason.clone())));
    } else {
        let mut first = part;
        let second = first.split_off(first.len() / 2);
        work.push(second);
        work.push(first);
    }
}

async fn send_touchpoints(conn: &Connection, rows: Vec<(Row, Payload)>) -> anyhow::Result<Outcome> {
    let mut out = Outcome {
        imported: 0,
        already_there: 0,
        rejected: Vec::new(),
    };
    // Resolve the identifiers of the batch in one call.
    let mut wanted: Vec<CustomerRef> = Vec::new();
    for (_, p) in &rows {
        if let Payload::Touchpoint(who @ CustomerRef::Identifier(..), _) = p
            && !wanted.contains(who)
        {
            wanted.push(who.clone());
        }
    }
    let mut resolved: HashMap<CustomerRef, String> = HashMap::new();
    if !wanted.is_empty() {
        let request = BatchLookupCustomersRequest {
            identifiers: wanted.iter().filter_map(CustomerRef::identifier).collect(),
        };
        let answer = with_retries(|| {
            let mut client = conn.customers();
            let request = request.clone();
            async move { client.batch_lookup_customers(request).await }
        })
        .await
        .map_err(|s| anyhow::anyhow!("BatchLookupCustomers: {s}"))?;
        for (who, result) in wanted.iter().zip(answer.into_inner().results) {
            if !result.customer.is_empty() {
                resolved.insert(who.clone(), result.customer);
            }
        }
    }
    let mut ready = Vec::with_capacity(rows.len());
    for (row, p) in rows {
        let Payload::Touchpoint(who, mut t) = p else {
            continue;
        };
        t.customer = match &who {
            CustomerRef::Name(n) => n.clone(),
            other => match resolved.get(other) {
                Some(name) => name.clone(),
                None => {
                    out.rejected
                        .push((row, format!("no customer has {}", other.describe())));
                    continue;
                }
            },
        };
        ready.push((row, Payload::Touchpoint(who, t)));
    }
    let mut work = vec![ready];
    while let Some(part) = work.pop() {
        if part.is_empty() {
            continue;
        }
        let request = RecordTouchpointsRequest {
            touchpoints: part
                .iter()
                .filter_map(|(_, p)| match p {
                    Payload::Touchpoint(_, t) => Some(t.clone()),
                    Payload::Customer(_) => None,
                })
                .collect(),
        };
        let answer = with_retries(|| {
            let mut client = conn.customers();
            let request = request.clone();
            async move { client.record_touchpoints(request).await }
        })
        .await;
        match answer {
            Ok(answer) => {
                let a = answer.into_inner();
                out.imported += a.recorded_count as u64;
                out.already_there += a.duplicate_count as u64;
                for c in a.conflicts {
                    if let Some((row, _)) = part.get(c.index as usize) {
                        out.rejected.push((
                            row.clone(),
                            format!("event_id {:?}: {}", c.event_id, c.description),
                        ));
                    }
                }
            }
            Err(status) if about_the_rows(status.code()) => {
                split_refused(status, "touchpoints", part, &mut work, &mut out.rejected);
            }
            Err(status) => bail!("RecordTouchpoints: {status}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_a_refusal_names_is_found_in_fields_and_messages() {
        assert_eq!(
            index_in("requests[12].customer.email", "requests"),
            Some(12)
        );
        assert_eq!(index_in("touchpoints[0].occurred_time", "requests"), None);
        let status = tonic::Status::with_error_details(
            Code::InvalidArgument,
            "bad",
            tonic_types::ErrorDetails::with_bad_request(vec![
                tonic_types::FieldViolation::new("requests[1].customer.email", "is not an e-mail"),
                tonic_types::FieldViolation::new("requests[9].customer.email", "out of range"),
            ]),
        );
        let named = named_rows(&status, "requests", 4);
        assert_eq!(named.len(), 1);
        assert_eq!(named[&1], "requests[1].customer.email: is not an e-mail");
    }

    #[test]
    fn a_key_depends_on_row_numbers_and_contents() {
        let row = |n: u64, email: &str| Row {
            number: n,
            fields: [("email".to_owned(), serde_json::Value::from(email))].into(),
            original: String::new(),
            end_offset: 0,
        };
        let k = key("customers", &[row(1, "a"), row(2, "b")]);
        assert_eq!(k, key("customers", &[row(1, "a"), row(2, "b")]));
        assert_ne!(k, key("customers", &[row(1, "a"), row(3, "b")]));
        assert_ne!(k, key("customers", &[row(1, "a"), row(2, "c")]));
        assert_ne!(k, key("touchpoints", &[row(1, "a"), row(2, "b")]));
    }
}
