//! A segment-log application that writes while its shard moves: it appends
//! records at a steady rate through the format crate's [`Writer`] (which
//! honours the writers' lock, the term, the fence and retirement), logs every
//! acknowledged record, waits while the shard is fenced, and when the shard
//! it writes to is retired (moved away), goes on writing to the new owner.
//!
//! An acknowledged record is one whose append returned: it is durable on the
//! replica that took it. After a move, every acknowledged record must be on
//! the new owner ([`records`] reads them back).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use segment_log_format::{Control, FormatError, RECORD_HEADER_LEN, Writer, segment_name};

/// The payload of record `seq`: its number first, so a reader finds it.
pub fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("ack-{seq:012}-").into_bytes();
    p.resize(size.max(p.len()), b'x');
    p
}

/// The sequence number a payload written by [`payload`] carries.
pub fn seq_of(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload.get(4..16)?).ok()?;
    payload.starts_with(b"ack-").then(|| text.parse().ok()).flatten()
}

/// What an appender run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub acked: u64,
    /// The longest time between two acknowledgements: the write pause as the
    /// application saw it.
    pub longest_gap: Duration,
    /// Appends refused (fenced, lock wait) before a retry succeeded.
    pub refused: u64,
    /// Whether it moved to the new owner after the old one was retired.
    pub switched: bool,
}

/// Options of a run.
pub struct Appender {
    /// The replica to write to.
    pub dir: PathBuf,
    /// Where to go on once `dir` is retired (the new owner), if anywhere.
    pub then: Option<PathBuf>,
    /// Records per second.
    pub rate: u32,
    pub record_size: usize,
    /// One line per acknowledged record: `<seq> <end position>`.
    pub acks: PathBuf,
    /// Stops when this file exists, or after `duration`.
    pub stop_file: Option<PathBuf>,
    pub duration: Duration,
}

impl Appender {
    pub fn run(&self) -> anyhow::Result<Summary> {
        let mut acks = std::fs::OpenOptions::new().create(true).append(true).open(&self.acks)?;
        let mut summary = Summary::default();
        let mut dir = self.dir.clone();
        let mut writer: Option<Writer> = None;
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.rate.max(1)));
        let mut last_ack = Instant::now();
        let mut seq = 0u64;
        while started.elapsed() < self.duration && !self.stop_file.as_ref().is_some_and(|f| f.exists()) {
            let w = match writer.as_mut() {
                Some(w) => w,
                None => match Writer::open(&dir) {
                    Ok(w) => writer.insert(w),
                    Err(FormatError::Fenced(why)) if why.contains("retired") => {
                        match &self.then {
                            Some(next) if !summary.switched => {
                                dir = next.clone();
                                summary.switched = true;
                            }
                            _ => anyhow::bail!("{} was retired and there is nowhere to go: {why}", dir.display()),
                        }
                        continue;
                    }
                    Err(_) => {
                        // Fenced, or the new owner not ready yet: wait a little.
                        summary.refused += 1;
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                },
            };
            let record = payload(seq, self.record_size);
            match w.append(&[&record]) {
                Ok(end) => {
                    writeln!(acks, "{seq} {end}")?;
                    acks.flush()?;
                    summary.acked += 1;
                    summary.longest_gap = summary.longest_gap.max(last_ack.elapsed());
                    last_ack = Instant::now();
                    seq += 1;
                    std::thread::sleep(interval);
                }
                Err(_) => {
                    // Fenced or a newer term: open again (at the new term
                    // once unfenced, or find it retired).
                    summary.refused += 1;
                    writer = None;
                }
            }
        }
        Ok(summary)
    }
}

/// The sequence numbers of the acknowledged records, from an acks file.
pub fn acked(acks: &Path) -> anyhow::Result<Vec<u64>> {
    let text = std::fs::read_to_string(acks)?;
    text.lines().map(|l| Ok(l.split_whitespace().next().unwrap_or("").parse::<u64>()?)).collect()
}

/// Every record payload of a segment-log shard, in log order.
pub fn records(dir: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let control = Control::read(dir)?;
    let size = control.segment_size;
    let mut out = Vec::new();
    let mut position = control.start;
    while position < control.flush {
        let index = position / size;
        let segment = std::fs::read(dir.join(segment_name(index)))?;
        let mut offset = (position - index * size) as usize;
        let end = ((control.flush - index * size).min(size)) as usize;
        while offset + RECORD_HEADER_LEN as usize <= end {
            let len = u32::from_le_bytes(segment[offset..offset + 4].try_into()?) as usize;
            if len == 0 {
                break;
            }
            let body = offset + RECORD_HEADER_LEN as usize;
            out.push(segment[body..body + len].to_vec());
            offset = body + len;
        }
        position = (index + 1) * size;
    }
    Ok(out)
}
