//! Long-running client commands for people: `keybroker key rewrap-all` moves a file of
//! envelopes to the newest key versions, many requests in flight, with a progress line on stderr
//! (when it is a terminal, or on request) and a summary table or JSON document at the end.

use std::{
    io::{BufRead, IsTerminal, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use futures_util::{StreamExt, stream};
use keybroker_proto::v1 as pb;
use serde_json::json;

use super::{Output, Progress, status};
use crate::client::Clients;

/// What `key rewrap-all` was asked to do.
pub struct RewrapAll {
    pub input: PathBuf,
    pub output_file: PathBuf,
    pub to: Option<String>,
    pub concurrency: usize,
    pub progress: Progress,
    pub out: Output,
    pub context: Option<pb::RequestContext>,
}

/// One input line's fate.
enum Outcome {
    Rewrapped {
        from: u32,
        to: u32,
        envelope: String,
    },
    Skipped,
    Failed(String),
}

/// A progress line redrawn in place at most every 100 ms.
struct Meter {
    on: bool,
    total: usize,
    started: Instant,
    last: Option<Instant>,
}

impl Meter {
    fn show(&mut self, done: usize, failed: usize, force: bool) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last
                .is_some_and(|l| now - l < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\rrewrap-all: {done}/{} ({pct}%), {failed} failed, {:.0}/s ",
            self.total,
            done as f64 / secs
        );
        let _ = e.flush();
    }

    fn finish(&mut self, done: usize, failed: usize) {
        self.show(done, failed, true);
        if self.on {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn read_input(p: &PathBuf) -> Result<Vec<String>, String> {
    let lines: Result<Vec<String>, std::io::Error> = if p.as_os_str() == "-" {
        std::io::stdin().lock().lines().collect()
    } else {
        let f = std::fs::File::open(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        std::io::BufReader::new(f).lines().collect()
    };
    lines.map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// `keybroker key rewrap-all`.
pub async fn rewrap_all(c: &Clients, a: RewrapAll) -> Result<(), String> {
    if !(1..=256).contains(&a.concurrency) {
        return Err("--concurrency must be between 1 and 256".into());
    }
    let lines = read_input(&a.input)?;
    let to_stdout = a.output_file.as_os_str() == "-";
    let mut meter = Meter {
        on: match a.progress {
            Progress::Always => true,
            Progress::Never => false,
            Progress::Auto => std::io::stderr().is_terminal(),
        },
        total: lines.len(),
        started: Instant::now(),
        last: None,
    };
    let items = lines.into_iter().enumerate().map(|(i, line)| {
        let mut broker = c.broker.clone();
        let to = a.to.clone().unwrap_or_default();
        let context = a.context.clone();
        async move {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                return (i, Outcome::Skipped);
            }
            let (b64, aad) = line.split_once('\t').unwrap_or((line, ""));
            let Ok(envelope) = B64.decode(b64.trim()) else {
                return (i, Outcome::Failed("not base64".into()));
            };
            let r = broker
                .rewrap(pb::RewrapRequest {
                    key: String::new(),
                    envelope,
                    aad: aad.as_bytes().to_vec(),
                    destination_key: to,
                    new_aad: Vec::new(),
                    change_aad: false,
                    context,
                })
                .await;
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    (
                        i,
                        Outcome::Rewrapped {
                            from: r.source_key_version,
                            to: r.key_version,
                            envelope: B64.encode(&r.wrapped_key),
                        },
                    )
                }
                Err(e) => (i, Outcome::Failed(status(e))),
            }
        }
    });
    // In order, so output line N answers input line N.
    let mut results = stream::iter(items).buffered(a.concurrency);
    let mut out_lines = Vec::with_capacity(meter.total);
    let (mut rewrapped, mut moved, mut skipped) = (0usize, 0usize, 0usize);
    let mut errors = Vec::new();
    while let Some((i, outcome)) = results.next().await {
        match outcome {
            Outcome::Rewrapped { from, to, envelope } => {
                rewrapped += 1;
                if from != to || a.to.is_some() {
                    moved += 1;
                }
                out_lines.push(envelope);
            }
            Outcome::Skipped => {
                skipped += 1;
                out_lines.push(String::new());
            }
            Outcome::Failed(why) => {
                errors.push((i + 1, why));
                out_lines.push(String::new());
            }
        }
        meter.show(i + 1, errors.len(), false);
    }
    meter.finish(out_lines.len(), errors.len());
    let mut text = out_lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    if to_stdout {
        print!("{text}");
    } else {
        std::fs::write(&a.output_file, text)
            .map_err(|e| format!("cannot write {}: {e}", a.output_file.display()))?;
    }
    let summary = json!({
        "total": meter.total,
        "rewrapped": rewrapped,
        "moved_to_newer_version": moved,
        "skipped": skipped,
        "failed": errors.len(),
        "errors": errors.iter().map(|(l, m)| json!({"line": l, "error": m})).collect::<Vec<_>>(),
        "seconds": meter.started.elapsed().as_secs_f64(),
    });
    let report = match a.out {
        Output::Json => summary.to_string(),
        Output::Text => {
            let mut t = String::new();
            for (k, v) in [
                ("envelopes read", meter.total),
                ("rewrapped", rewrapped),
                ("moved to a newer version", moved),
                ("skipped (blank/comment)", skipped),
                ("failed", errors.len()),
            ] {
                t.push_str(&format!("{k:<26} {v:>8}\n"));
            }
            if !errors.is_empty() {
                t.push_str(&format!("\n{:>6}  ERROR\n", "LINE"));
                for (l, m) in &errors {
                    t.push_str(&format!("{l:>6}  {m}\n"));
                }
            }
            t.trim_end().to_string()
        }
    };
    if to_stdout {
        eprintln!("{report}");
    } else {
        println!("{report}");
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} envelopes could not be rewrapped (see above)",
            errors.len(),
            meter.total
        ))
    }
}
