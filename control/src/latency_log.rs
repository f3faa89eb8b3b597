//! The workers' time histograms as an HdrHistogram interval log (`.hlog`,
//! the format HdrHistogram's own plotters and HistogramLogAnalyzer read),
//! served at `/latency.hlog` on the metrics port; and what `kxp dump
//! latency` does with it: fetch it, print per-core percentiles, keep the
//! raw file.
//!
//! One interval per worker and part, tagged `q<queue>.<part>`, covering kxp's
//! run since start. Parts: `batch` (per packet, RX ring read to last TX
//! submit), `engine`, `tx_wakeup`, `sleep` (see `runtime::latency`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, IntervalLogWriterBuilder, LogEntry, Tag};
use hdrhistogram::serialization::{Deserializer, V2Serializer};
use hdrhistogram::Histogram;
use runtime::worker::WorkerReport;

/// The log for `reports`, whose histograms began at `started`.
pub fn encode(reports: &[WorkerReport], started: SystemTime) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut serializer = V2Serializer::new();
    let mut log = IntervalLogWriterBuilder::new()
        .with_base_time(started)
        .with_start_time(started)
        .begin_log_with(&mut out, &mut serializer)
        .map_err(|e| e.to_string())?;
    let elapsed = started.elapsed().unwrap_or(Duration::ZERO);
    for r in reports {
        let parts = std::iter::once(("batch", &r.latency)).chain(r.parts.named());
        for (part, h) in parts {
            let tag = format!("q{}.{part}", r.queue);
            log.write_histogram(h, Duration::ZERO, elapsed, Tag::new(&tag))
                .map_err(|e| format!("{tag}: {e:?}"))?;
        }
    }
    drop(log);
    Ok(out)
}

/// The tagged histograms of a log.
pub fn decode(log: &[u8]) -> Result<Vec<(String, Histogram<u64>)>, String> {
    let mut out = Vec::new();
    let mut deserializer = Deserializer::new();
    for entry in IntervalLogIterator::new(log) {
        let LogEntry::Interval(interval) = entry.map_err(|e| format!("not an interval log: {e:?}"))? else {
            continue;
        };
        let tag = interval.tag().map_or_else(String::new, |t| t.as_str().to_string());
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(interval.encoded_histogram())
            .map_err(|e| format!("{tag}: {e}"))?;
        let h: Histogram<u64> = deserializer
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| format!("{tag}: {e:?}"))?;
        out.push((tag, h));
    }
    Ok(out)
}

/// One line per tagged histogram: samples and p50, p90, p99, p99.9, max,
/// in microseconds.
pub fn table(hists: &[(String, Histogram<u64>)]) -> String {
    let mut s = format!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "worker.part", "samples", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
    );
    for (tag, h) in hists {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        s.push_str(&format!(
            "{:<16} {:>10} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}\n",
            tag,
            h.len(),
            us(0.5),
            us(0.9),
            us(0.99),
            us(0.999),
            h.max() as f64 / 1000.0
        ));
    }
    s
}

/// Most bytes `fetch` reads.
const MAX_LOG_BYTES: u64 = 16 << 20;

/// `GET /latency.hlog` from a running kxp's metrics address.
pub fn fetch(addr: SocketAddr) -> Result<Vec<u8>, String> {
    let err = |e: std::io::Error| {
        format!("cannot read {addr}/latency.hlog: {e}; is kxp running with metricsBindAddress {addr}?")
    };
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(err)?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(err)?;
    conn.write_all(format!("GET /latency.hlog HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(err)?;
    // A log is a few KB per worker; whatever answers at that address gets
    // no more than this much of kxp's memory.
    let mut reply = Vec::new();
    conn.take(MAX_LOG_BYTES).read_to_end(&mut reply).map_err(err)?;
    if reply.len() as u64 >= MAX_LOG_BYTES {
        return Err(format!(
            "{addr}/latency.hlog: more than {MAX_LOG_BYTES} bytes, not kxp's log"
        ));
    }
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    let status = String::from_utf8_lossy(&reply[..split]);
    if !status.starts_with("HTTP/1.0 200") && !status.starts_with("HTTP/1.1 200") {
        let line = status.lines().next().unwrap_or_default().to_string();
        return Err(format!("{addr}/latency.hlog: {line}"));
    }
    Ok(reply[split + 4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::latency::PartTimes;

    fn report(queue: u32, batch_ns: u64, engine_ns: u64) -> WorkerReport {
        let mut latency = runtime::latency::new_histogram();
        latency.record_n(batch_ns, 10).unwrap();
        let mut parts = PartTimes::default();
        parts.engine.record_n(engine_ns, 5).unwrap();
        WorkerReport {
            queue,
            core: None,
            stats: Default::default(),
            runtime: Default::default(),
            latency,
            parts,
            frames: Default::default(),
            kernel: Default::default(),
            copy_mode: Vec::new(),
            umems: 1,
            running: true,
        }
    }

    #[test]
    fn the_log_carries_every_worker_and_part_and_reads_back_whole() {
        let started = SystemTime::now() - Duration::from_secs(5);
        let log = encode(&[report(0, 200_000, 150), report(1, 90_000, 300)], started).unwrap();
        assert!(log.starts_with(b"#"), "an interval log starts with its comments");
        let hists = decode(&log).unwrap();
        let tags: Vec<&str> = hists.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            tags,
            [
                "q0.batch",
                "q0.engine",
                "q0.tx_wakeup",
                "q0.sleep",
                "q1.batch",
                "q1.engine",
                "q1.tx_wakeup",
                "q1.sleep"
            ]
        );
        let get = |tag: &str| &hists.iter().find(|(t, _)| t == tag).unwrap().1;
        assert_eq!(get("q0.batch").len(), 10);
        assert!(get("q0.batch").equivalent(200_000, get("q0.batch").value_at_quantile(0.5)));
        assert!(get("q1.engine").equivalent(300, get("q1.engine").max()));
        let table = table(&hists);
        assert!(table.contains("q1.engine"), "{table}");
        assert!(table.lines().count() == 9, "{table}");
    }

    /// Whatever answers at the metrics address cannot make `kxp dump`
    /// read without end.
    #[test]
    fn an_endless_answer_is_cut_off_and_refused() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = server.accept().unwrap();
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            let chunk = vec![b'#'; 1 << 20];
            while c.write_all(&chunk).is_ok() {}
        });
        let err = fetch(addr).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_table() {
        assert!(decode(b"Tag=x,0.0,1.0,1.0,not-base64!!\n").is_err());
    }
}
