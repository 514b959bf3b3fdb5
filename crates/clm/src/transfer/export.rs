//! `clm export segment ID`: a segment's members (customer, enter time) as
//! CSV or JSON Lines, page by page through ListSegmentMembers, with
//! progress against the segment's member count.

use super::Connection;
use super::progress::Progress;
use super::rows::Format;
use anyhow::Context;
use clm_proto::clm::segmentation::v1::{GetSegmentRequest, ListSegmentMembersRequest};
use std::io::Write;
use std::path::Path;

/// Writes the members of `segment` (`segments/{id}` or the bare id) to
/// `out` (stdout when `None`); returns how many.
pub async fn segment(
    conn: &Connection,
    segment: &str,
    format: Format,
    out: Option<&Path>,
) -> anyhow::Result<u64> {
    let name = if segment.starts_with("segments/") {
        segment.to_owned()
    } else {
        format!("segments/{segment}")
    };
    let mut client = conn.segments();
    let total = client
        .get_segment(GetSegmentRequest { name: name.clone() })
        .await
        .with_context(|| format!("GetSegment {name}"))?
        .into_inner()
        .member_count;
    let sink: Box<dyn Write> = match out {
        Some(path) => Box::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let sink = std::io::BufWriter::new(sink);
    let mut out = match format {
        Format::Csv => {
            let mut w = csv::Writer::from_writer(sink);
            w.write_record(["customer", "enter_time"])?;
            Out::Csv(Box::new(w))
        }
        Format::Jsonl => Out::Jsonl(sink),
    };
    let mut progress = Progress::new("export", u64::try_from(total).ok(), 0, 0);
    let mut count = 0u64;
    let mut page_token = String::new();
    loop {
        let page = client
            .list_segment_members(ListSegmentMembersRequest {
                parent: name.clone(),
                page_size: 1000,
                page_token,
            })
            .await
            .with_context(|| format!("ListSegmentMembers {name}"))?
            .into_inner();
        for m in &page.members {
            let enter_time = m.enter_time.map(rfc3339).unwrap_or_default();
            match &mut out {
                Out::Csv(w) => w.write_record([m.customer.as_str(), enter_time.as_str()])?,
                Out::Jsonl(w) => {
                    let line =
                        serde_json::json!({"customer": m.customer, "enter_time": enter_time});
                    writeln!(w, "{line}")?;
                }
            }
        }
        count += page.members.len() as u64;
        progress.set(count, count);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    match &mut out {
        Out::Csv(w) => w.flush()?,
        Out::Jsonl(w) => w.flush()?,
    }
    progress.finish();
    eprintln!(
        "exported {count} members of {name} in {:.1} s",
        progress.elapsed().as_secs_f64()
    );
    Ok(count)
}

enum Out {
    Csv(Box<csv::Writer<std::io::BufWriter<Box<dyn Write>>>>),
    Jsonl(std::io::BufWriter<Box<dyn Write>>),
}

fn rfc3339(t: prost_types::Timestamp) -> String {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}
