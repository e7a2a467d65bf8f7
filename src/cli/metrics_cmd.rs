//! `erofs-fanotify metrics [--output FILE]`: Prometheus text exposition (format 0.0.4) of every mount.
//!
//! Why a file for node_exporter's textfile collector rather than an HTTP endpoint: agents are per blob
//! and come and go with their mounts, so no single long-lived process could serve a port without adding a
//! daemon; a listening socket is also more attack surface on a container host, and node_exporter is
//! usually there already. A systemd timer (contrib/systemd/erofs-fanotify-metrics.{service,timer}) runs
//! `erofs-fanotify metrics --output /var/lib/prometheus/node-exporter/erofs-fanotify.prom`; the file is
//! written to a temporary name in the same directory and renamed, so the collector never reads half a file.
//!
//! One series per mount, labelled with `mountpoint`, `digest` and `source`. The counters are the agent's
//! (one agent per blob): two mounts of one blob show the same values. Rendering is pure ([`render`]).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use erofs_fanotify_state::{self as state, MountRecord};

use crate::agent::protocol::{Reply, Request, MountStatus};
use crate::agent::stats::HistogramSnapshot;

use super::client::AgentConn;
use super::CliError;

/// The labels of one mount's series.
#[derive(Debug, Clone)]
pub struct MountLabels {
    pub mountpoint: String,
    pub digest: String,
    pub source: String,
}

/// One mount and what its agent said (None: the agent is gone or does not answer).
pub struct MountSample {
    pub labels: MountLabels,
    pub stats: Option<MountStatus>,
}

type Getter = fn(&MountStatus) -> u64;

const COUNTERS: &[(&str, &str, Getter)] = &[
    ("fetched_bytes_total", "Bytes fetched from the remote", |s| s.fetched_bytes),
    ("fetch_requests_total", "Range requests sent to the remote", |s| s.fetch_requests),
    ("fetch_errors_total", "Failed range requests", |s| s.fetch_errors),
    ("events_total", "fanotify pre-content events handled", |s| s.events),
    ("fast_path_events_total", "Events whose range was already present", |s| s.fast_path_events),
    ("denied_events_total", "Events answered with an error (reader got EIO)", |s| s.denied_events),
    ("prefetched_bytes_total", "Bytes fetched by background prefetch", |s| s.prefetched_bytes),
];

const GAUGES: &[(&str, &str, Getter)] = &[
    ("blob_size_bytes", "Size of the image blob", |s| s.blob_size),
    ("populated_bytes", "Bytes of the blob present in the local cache", |s| s.populated_bytes),
];

type HistogramGetter = fn(&MountStatus) -> &HistogramSnapshot;

const HISTOGRAMS: &[(&str, &str, HistogramGetter)] = &[
    ("fetch_latency_seconds", "Latency of one range fetch from the remote", |s| &s.fetch_latency),
    ("event_wait_seconds", "Time a reader waited on a pre-content event", |s| &s.event_wait),
];

const PREFIX: &str = "erofs_fanotify_";

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_set(labels: &MountLabels, extra: Option<(&str, &str)>) -> String {
    let mut out = format!(
        "mountpoint=\"{}\",digest=\"{}\",source=\"{}\"",
        escape_label(&labels.mountpoint),
        escape_label(&labels.digest),
        escape_label(&labels.source)
    );
    if let Some((k, v)) = extra {
        let _ = write!(out, ",{k}=\"{}\"", escape_label(v));
    }
    out
}

/// A float the way Prometheus writes it (`+Inf`, no exponent surprises for ordinary values).
fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// The whole exposition for these mounts.
pub fn render(samples: &[MountSample]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP {PREFIX}up Whether the mount's agent answered (1) or not (0)");
    let _ = writeln!(out, "# TYPE {PREFIX}up gauge");
    for s in samples {
        let _ = writeln!(out, "{PREFIX}up{{{}}} {}", label_set(&s.labels, None), u8::from(s.stats.is_some()));
    }
    let answering: Vec<(&MountLabels, &MountStatus)> =
        samples.iter().filter_map(|s| s.stats.as_ref().map(|st| (&s.labels, st))).collect();
    for (kind, table) in [("counter", COUNTERS), ("gauge", GAUGES)] {
        for (name, help, get) in table {
            let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
            let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
            for (labels, stats) in &answering {
                let _ = writeln!(out, "{PREFIX}{name}{{{}}} {}", label_set(labels, None), get(stats));
            }
        }
    }
    for (name, help, get) in HISTOGRAMS {
        let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(out, "# TYPE {PREFIX}{name} histogram");
        for (labels, stats) in &answering {
            let h = get(stats);
            // The snapshot's buckets are per interval; Prometheus wants cumulative `le` buckets.
            let mut cumulative = 0u64;
            for (bound, count) in h.buckets.iter().zip(&h.counts) {
                cumulative = cumulative.saturating_add(*count);
                let _ = writeln!(out, "{PREFIX}{name}_bucket{{{}}} {cumulative}", label_set(labels, Some(("le", &float(*bound)))));
            }
            let _ = writeln!(out, "{PREFIX}{name}_bucket{{{}}} {}", label_set(labels, Some(("le", "+Inf"))), h.count.max(cumulative));
            let _ = writeln!(out, "{PREFIX}{name}_sum{{{}}} {}", label_set(labels, None), float(h.sum_seconds));
            let _ = writeln!(out, "{PREFIX}{name}_count{{{}}} {}", label_set(labels, None), h.count.max(cumulative));
        }
    }
    out
}

fn sample(record: &MountRecord) -> MountSample {
    let stats = if record.agent.is_alive() { query(&record.control_socket) } else { None };
    MountSample {
        labels: MountLabels {
            mountpoint: record.mountpoint.display().to_string(),
            digest: record.digest.clone().unwrap_or_default(),
            source: record.source.clone(),
        },
        stats,
    }
}

fn query(socket: &Path) -> Option<MountStatus> {
    let mut conn = AgentConn::connect(socket, Duration::from_secs(3)).ok()?;
    match conn.call(&Request::Stats) {
        Ok(Reply::Stats(s)) => Some(*s),
        _ => None,
    }
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // node_exporter reads only *.prom: the temporary name does not end in it.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn run(output: Option<PathBuf>) -> Result<(), CliError> {
    let state_dir = super::state_dir();
    let records = state::list_mount_records(&state_dir).map_err(|e| CliError::new(format!("cannot list mounts: {e}")))?;
    let samples: Vec<MountSample> = records
        .into_iter()
        .filter_map(|r| r.map_err(|e| tracing::warn!(error = %e, "skipping an unreadable mount record")).ok())
        .map(|r| sample(&r))
        .collect();
    let text = render(&samples);
    match output {
        Some(path) => write_atomically(&path, &text)
            .map_err(|e| CliError::new(format!("cannot write {}: {e}", path.display()))),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let stats = MountStatus {
            fetched_bytes: 4096,
            fetch_requests: 2,
            fetch_latency: HistogramSnapshot { buckets: vec![0.001, 0.01], counts: vec![1, 2], count: 4, sum_seconds: 1.5 },
            ..Default::default()
        };
        let text = render(&[
            MountSample {
                labels: MountLabels { mountpoint: "/mnt/a \"q\"".into(), digest: "sha256:ab".into(), source: "r/x".into() },
                stats: Some(stats),
            },
            MountSample {
                labels: MountLabels { mountpoint: "/mnt/b".into(), digest: String::new(), source: "u".into() },
                stats: None,
            },
        ]);
        assert!(text.contains("erofs_fanotify_fetched_bytes_total{mountpoint=\"/mnt/a \\\"q\\\"\",digest=\"sha256:ab\",source=\"r/x\"} 4096"), "{text}");
        assert!(text.contains("erofs_fanotify_fetch_latency_seconds_bucket{mountpoint=\"/mnt/a \\\"q\\\"\",digest=\"sha256:ab\",source=\"r/x\",le=\"0.01\"} 3"), "{text}");
        assert!(text.contains(",le=\"+Inf\"} 4"), "{text}");
        assert!(text.contains("erofs_fanotify_up{mountpoint=\"/mnt/b\",digest=\"\",source=\"u\"} 0"), "{text}");
        assert!(!text.contains("fetched_bytes_total{mountpoint=\"/mnt/b\""), "{text}");
    }
}
