//! Progress of an import or export: an indicatif bar (rows/s, ETA) on a
//! terminal, a plain line every few seconds when stderr is not one (a log,
//! a CI job).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a plain progress line is printed.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress measured in `unit`s of a known (or unknown) total: bytes of
/// the input for an import (so the ETA holds however long rows are),
/// members for an export.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    label: &'static str,
    total: Option<u64>,
    position: u64,
    rows: u64,
    started: Instant,
    last_line: Instant,
    rows_at_start: u64,
    position_at_start: u64,
}

impl Progress {
    /// `position` and `rows` are where a resumed run starts.
    pub fn new(label: &'static str, total: Option<u64>, position: u64, rows: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                None => ProgressBar::new_spinner(),
            };
            let template = if total.is_some() {
                "{spinner} {prefix} [{elapsed_precise}] [{wide_bar}] {percent}% {msg} ETA {eta}"
            } else {
                "{spinner} {prefix} [{elapsed_precise}] {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label);
            bar.set_position(position);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            label,
            total,
            position,
            rows,
            started: now,
            last_line: now,
            rows_at_start: rows,
            position_at_start: position,
        }
    }

    /// Rows per second in this run (a resumed run counts from its start).
    pub fn rate(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        (self.rows - self.rows_at_start) as f64 / secs
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `rows` done in total, at `position` of the total.
    pub fn set(&mut self, position: u64, rows: u64) {
        self.position = position;
        self.rows = rows;
        let rate = self.rate();
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(format!("{rows} rows, {rate:.0} rows/s"));
        } else if self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    fn line(&self) -> String {
        let rate = self.rate();
        match self.total {
            Some(total) if total > 0 => {
                let done = self.position as f64 / total as f64;
                // This run's pace: a resumed run started part of the way in.
                let moved = (self.position.saturating_sub(self.position_at_start) as f64
                    / total as f64)
                    .max(1e-9);
                let eta = self.started.elapsed().as_secs_f64() * (1.0 - done) / moved;
                format!(
                    "{}: {} rows, {rate:.0} rows/s, {:.1}%, ETA {:.0} s",
                    self.label,
                    self.rows,
                    done * 100.0,
                    eta
                )
            }
            _ => format!("{}: {} rows, {rate:.0} rows/s", self.label, self.rows),
        }
    }

    /// Clears the bar; the caller prints the summary.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
