//! Reading an import file: CSV (columns named by its header) or JSON Lines
//! (one object per line), each row's columns renamed to CLM fields by an
//! optional mapping file, with the byte offset after each row for progress.

use anyhow::{Context, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// The two file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// JSON Lines: one JSON object per line.
    Jsonl,
}

impl Format {
    /// `given`, else from the file name (`.jsonl`, `.ndjson`, `.json`: JSON
    /// Lines; anything else CSV).
    pub fn of(path: &Path, given: Option<Format>) -> Format {
        given.unwrap_or_else(
            || match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
                "jsonl" | "ndjson" | "json" => Format::Jsonl,
                _ => Format::Csv,
            },
        )
    }
}

/// One data row: its number (1 = the first data row, not the header), its
/// fields by CLM field name, its original text (for the rejects file) and
/// the file offset just after it.
#[derive(Debug, Clone)]
pub struct Row {
    pub number: u64,
    pub fields: BTreeMap<String, Value>,
    pub original: String,
    pub end_offset: u64,
}

impl Row {
    /// The field as text (`None` when absent, null or empty).
    pub fn text(&self, field: &str) -> Option<String> {
        match self.fields.get(field)? {
            Value::Null => None,
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(s.trim().to_owned()),
            other => Some(other.to_string()),
        }
    }

    /// The row's content in a stable form: what its idempotency key hashes.
    pub fn canonical(&self) -> String {
        serde_json::to_string(&self.fields).unwrap_or_default()
    }
}

/// Column → field renames read from a mapping file: a CSV with the header
/// `column,field`; a field of `-` drops the column.
#[derive(Debug, Default, Clone)]
pub struct Mapping(BTreeMap<String, String>);

impl Mapping {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Mapping> {
        let Some(path) = path else {
            return Ok(Mapping::default());
        };
        let mut reader = csv::Reader::from_path(path)
            .with_context(|| format!("reading the mapping file {}", path.display()))?;
        let headers = reader.headers()?.clone();
        if headers.len() != 2 || &headers[0] != "column" || &headers[1] != "field" {
            bail!(
                "{}: a mapping file starts with the header `column,field`",
                path.display()
            );
        }
        let mut map = BTreeMap::new();
        for record in reader.records() {
            let record = record?;
            map.insert(record[0].trim().to_owned(), record[1].trim().to_owned());
        }
        Ok(Mapping(map))
    }

    /// The field a column feeds (`None`: dropped).
    fn field<'a>(&'a self, column: &'a str) -> Option<&'a str> {
        match self.0.get(column).map(String::as_str) {
            Some("-") => None,
            Some(field) => Some(field),
            None => Some(column),
        }
    }

    /// Every field the columns feed must be one `known` accepts: a typo in
    /// a header stops the import before anything is sent.
    pub fn check(&self, columns: &[String], known: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let unknown: Vec<&str> = columns
            .iter()
            .filter_map(|c| self.field(c).filter(|f| !known(f)).map(|_| c.as_str()))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "unknown column(s) {unknown:?}: name a field in the header or map the column \
                 with --mapping (a `column,field` CSV; field `-` drops it)"
            );
        }
        Ok(())
    }

    fn apply(&self, pairs: impl Iterator<Item = (String, Value)>) -> BTreeMap<String, Value> {
        pairs
            .filter_map(|(c, v)| self.field(&c).map(|f| (f.to_owned(), v)))
            .collect()
    }
}

/// Rows of an import file, in order. A row that cannot be read (bad CSV
/// quoting, a line that is not a JSON object) is an `Err` carrying the row
/// to reject, not the end of the import.
pub struct Reader {
    inner: Inner,
    mapping: Mapping,
    number: u64,
    pub total_bytes: u64,
}

enum Inner {
    Csv(csv::Reader<File>, csv::StringRecord),
    Jsonl(BufReader<File>, u64),
}

/// A row that could not be read: its number, text and why.
#[derive(Debug)]
pub struct Unreadable {
    pub row: Row,
    pub reason: String,
}

impl Reader {
    pub fn open(path: &Path, format: Format, mapping: Mapping) -> anyhow::Result<Reader> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let total_bytes = file.metadata()?.len();
        let inner = match format {
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
                let headers = reader.headers()?.clone();
                Inner::Csv(reader, headers)
            }
            Format::Jsonl => Inner::Jsonl(BufReader::new(file), 0),
        };
        Ok(Reader {
            inner,
            mapping,
            number: 0,
            total_bytes,
        })
    }

    /// The columns the file names: the CSV header, or the keys of the
    /// first JSON line (read again by `next`).
    pub fn columns(path: &Path, format: Format) -> anyhow::Result<Vec<String>> {
        match format {
            Format::Csv => Ok(csv::Reader::from_path(path)?
                .headers()?
                .iter()
                .map(str::to_owned)
                .collect()),
            Format::Jsonl => {
                let mut keys = Vec::new();
                let reader = BufReader::new(File::open(path)?);
                for line in reader.lines().take(1000) {
                    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&line?) {
                        keys.extend(
                            o.keys()
                                .filter(|k| !keys.contains(*k))
                                .cloned()
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                Ok(keys)
            }
        }
    }

    fn next_row(&mut self) -> Option<Result<Row, Unreadable>> {
        self.number += 1;
        let number = self.number;
        match &mut self.inner {
            Inner::Csv(reader, headers) => {
                let mut record = csv::StringRecord::new();
                match reader.read_record(&mut record) {
                    Ok(false) => None,
                    Ok(true) => {
                        let end_offset = reader.position().byte();
                        let original = csv_line(&record);
                        if record.len() != headers.len() {
                            return Some(Err(Unreadable {
                                reason: format!(
                                    "has {} columns, the header {}",
                                    record.len(),
                                    headers.len()
                                ),
                                row: Row {
                                    number,
                                    fields: BTreeMap::new(),
                                    original,
                                    end_offset,
                                },
                            }));
                        }
                        let pairs = headers
                            .iter()
                            .zip(record.iter())
                            .map(|(h, v)| (h.to_owned(), Value::String(v.to_owned())));
                        Some(Ok(Row {
                            number,
                            fields: self.mapping.apply(pairs),
                            original,
                            end_offset,
                        }))
                    }
                    Err(e) => {
                        let end_offset = reader.position().byte();
                        Some(Err(Unreadable {
                            reason: format!("unreadable CSV: {e}"),
                            row: Row {
                                number,
                                fields: BTreeMap::new(),
                                original: String::new(),
                                end_offset,
                            },
                        }))
                    }
                }
            }
            Inner::Jsonl(reader, offset) => loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => return None,
                    Ok(n) => {
                        *offset += n as u64;
                        let text = line.trim_end_matches(['\n', '\r']).to_owned();
                        if text.trim().is_empty() {
                            continue;
                        }
                        let row = |fields| Row {
                            number,
                            fields,
                            original: text.clone(),
                            end_offset: *offset,
                        };
                        return Some(match serde_json::from_str::<Value>(&text) {
                            Ok(Value::Object(o)) => Ok(row(self.mapping.apply(o.into_iter()))),
                            Ok(_) => Err(Unreadable {
                                reason: "is not a JSON object".into(),
                                row: row(BTreeMap::new()),
                            }),
                            Err(e) => Err(Unreadable {
                                reason: format!("unreadable JSON: {e}"),
                                row: row(BTreeMap::new()),
                            }),
                        });
                    }
                    Err(e) => {
                        return Some(Err(Unreadable {
                            reason: format!("unreadable line: {e}"),
                            row: Row {
                                number,
                                fields: BTreeMap::new(),
                                original: String::new(),
                                end_offset: *offset,
                            },
                        }));
                    }
                }
            },
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Row, Unreadable>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_row()
    }
}

fn csv_line(record: &csv::StringRecord) -> String {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let _ = writer.write_record(record);
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str, ext: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(ext)
            .tempfile()
            .expect("temp");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn csv_rows_are_mapped_and_numbered_and_a_short_row_is_unreadable() {
        let f = file("E-Mail,name,skip\na@x.io,Ada,1\nb@x.io\n", ".csv");
        let map = file(
            "column,field\nE-Mail,email\nname,display_name\nskip,-\n",
            ".csv",
        );
        let mapping = Mapping::load(Some(map.path())).expect("mapping");
        let rows: Vec<_> = Reader::open(f.path(), Format::Csv, mapping)
            .expect("open")
            .collect();
        let first = rows[0].as_ref().expect("row 1");
        assert_eq!(first.number, 1);
        assert_eq!(first.text("email").as_deref(), Some("a@x.io"));
        assert_eq!(first.text("display_name").as_deref(), Some("Ada"));
        assert!(!first.fields.contains_key("skip"));
        let second = rows[1].as_ref().expect_err("short row");
        assert_eq!(second.row.number, 2);
        assert_eq!(
            second.row.end_offset,
            f.path().metadata().expect("len").len()
        );
    }

    #[test]
    fn jsonl_keeps_types_and_rejects_a_line_that_is_not_an_object() {
        let f = file(
            "{\"email\":\"a@x.io\",\"attributes.vip\":true}\n\n[1]\n",
            ".jsonl",
        );
        assert_eq!(Format::of(f.path(), None), Format::Jsonl);
        let rows: Vec<_> = Reader::open(f.path(), Format::Jsonl, Mapping::default())
            .expect("open")
            .collect();
        assert_eq!(rows.len(), 2);
        let first = rows[0].as_ref().expect("row 1");
        assert_eq!(first.fields["attributes.vip"], Value::Bool(true));
        let bad = rows[1].as_ref().expect_err("array");
        assert_eq!((bad.row.number, bad.row.original.as_str()), (2, "[1]"));
    }

    #[test]
    fn an_unknown_column_stops_the_import() {
        let known = |f: &str| f == "email";
        let columns = vec!["email".to_owned(), "emial".to_owned()];
        let err = Mapping::default().check(&columns, known).expect_err("typo");
        assert!(err.to_string().contains("emial"));
    }
}
