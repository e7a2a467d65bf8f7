//! `erofs-fanotify metrics` prints Prometheus text (checked by a small parser of the exposition format:
//! HELP/TYPE lines, label escaping, values, histogram buckets cumulative with `+Inf` = `_count`), one series
//! per mount, and its counters move when data is read. `--output FILE` writes the same text atomically for
//! node_exporter's textfile collector.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::oci::{push_single, reference, tiny_image, OciEnv};
use common::registry;
use common::{cmd, ready, COMMAND_TIMEOUT, EROFS_FANOTIFY, GONE_TIMEOUT};

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text exposition format (0.0.4); panics with the line on any violation.
fn parse_exposition(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| -> ! { panic!("line {}: {why}: {line:?}\n{text}", n + 1) };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        bad("unknown type");
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        bad("TYPE given twice");
                    }
                }
                (Some("HELP"), Some(_), _) => {}
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad("no value"));
        let name = &line[..name_end];
        if name.is_empty()
            || !name.chars().enumerate().all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
        {
            bad("bad metric name");
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let consumed: Option<usize>;
            loop {
                // label name
                let start = chars.peek().map(|(i, _)| *i).unwrap_or_else(|| bad("unterminated labels"));
                if after[start..].starts_with('}') {
                    consumed = Some(start + 1);
                    break;
                }
                let eq = after[start..].find('=').unwrap_or_else(|| bad("label without '='")) + start;
                let key = &after[start..eq];
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    bad("bad label name");
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    bad("label value not quoted");
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            _ => bad("bad escape"),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => bad("unterminated label value"),
                    }
                }
                if labels.insert(key.to_string(), value).is_some() {
                    bad("label given twice");
                }
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((i, '}')) => {
                        consumed = Some(i + 1);
                        break;
                    }
                    _ => bad("expected ',' or '}'"),
                }
            }
            rest = &after[consumed.unwrap_or_else(|| bad("labels"))..];
        }
        let value_text = rest.strip_prefix(' ').unwrap_or_else(|| bad("no space before the value"));
        let value_text = value_text.split(' ').next().unwrap_or_default(); // an optional timestamp follows
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| bad("value is not a float")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).map(String::as_str) == Some("histogram")))
            .unwrap_or(name);
        if !types.contains_key(family) {
            bad("sample before its TYPE line");
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    check_histograms(&types, &samples);
    (types, samples)
}

/// Buckets are cumulative (non-decreasing in `le`), and `le="+Inf"` equals `_count`.
fn check_histograms(types: &HashMap<String, String>, samples: &[Sample]) {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == format!("{family}_bucket")) {
            let mut key = s.labels.clone();
            let le = key.remove("le").expect("bucket without le");
            let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le is a float") };
            series.entry(format!("{key:?}")).or_default().push((le, s.value));
        }
        for (key, buckets) in series {
            assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{family} {key}: {buckets:?}");
            let (last_le, last) = *buckets.last().expect("buckets");
            assert!(last_le.is_infinite(), "{family} {key}: no +Inf bucket");
            let count = samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && format!("{:?}", s.labels) == key)
                .unwrap_or_else(|| panic!("{family} {key}: no _count"));
            assert_eq!(count.value, last, "{family} {key}: +Inf bucket != _count");
        }
    }
}

fn value(samples: &[Sample], name: &str, mountpoint: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get("mountpoint").map(String::as_str) == Some(mountpoint))
        .unwrap_or_else(|| panic!("no {name} for {mountpoint}: {samples:#?}"))
        .value
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn prometheus_metrics_parse_and_move() {
    if !ready() {
        return;
    }
    let img = tiny_image("metrics");
    let pushed = push_single(registry::shared(), "test/metrics", "v1", &img.image.path);
    let image_ref = reference(&registry::shared().host(), &pushed.repo, &pushed.tag);
    let env = OciEnv::new("host-metrics");
    let m = env.mount(&image_ref, "mnt", &[]);
    let mountpoint = m.mountpoint.display().to_string();

    let metrics = || {
        let out = cmd::run(env.command(EROFS_FANOTIFY).arg("metrics"), COMMAND_TIMEOUT);
        out.assert_success();
        parse_exposition(&out.stdout_str())
    };
    let (types, before) = metrics();
    assert_eq!(types.get("erofs_fanotify_fetched_bytes_total").map(String::as_str), Some("counter"));
    assert_eq!(types.get("erofs_fanotify_fetch_latency_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(types.get("erofs_fanotify_event_wait_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(value(&before, "erofs_fanotify_up", &mountpoint), 1.0);
    let series = before.iter().find(|s| s.name == "erofs_fanotify_up").expect("up");
    assert!(series.labels["digest"].contains(img.hex()), "{series:?}");

    // Read every file: data comes from the registry, so the counters must move.
    let mut largest = (0u64, std::path::PathBuf::new());
    for entry in walk(&img.tree) {
        let rel = entry.strip_prefix(&img.tree).expect("rel");
        let data = std::fs::read(m.path(rel)).expect("read through the mount");
        assert_eq!(data, std::fs::read(&entry).expect("read source"), "{}", rel.display());
        largest = largest.max((data.len() as u64, rel.to_path_buf()));
    }
    assert!(largest.0 > 100_000, "no large file in the tiny image");
    let (_, after) = metrics();
    for name in [
        "erofs_fanotify_fetched_bytes_total",
        "erofs_fanotify_fetch_requests_total",
        "erofs_fanotify_events_total",
        "erofs_fanotify_populated_bytes",
        "erofs_fanotify_fetch_latency_seconds_count",
        "erofs_fanotify_event_wait_seconds_count",
    ] {
        let (b, a) = (value(&before, name, &mountpoint), value(&after, name, &mountpoint));
        eprintln!("{name}: {b} -> {a}");
        assert!(a > b, "{name} did not move: {b} -> {a}");
    }

    // --output: the same text, written atomically (no temporary file left beside it).
    let dir = env.root.join("textfile");
    std::fs::create_dir_all(&dir).expect("textfile dir");
    let file = dir.join("erofs-fanotify.prom");
    cmd::run(env.command(EROFS_FANOTIFY).arg("metrics").arg("--output").arg(&file), COMMAND_TIMEOUT).assert_success();
    let (_, written) = parse_exposition(&std::fs::read_to_string(&file).expect("metrics file"));
    assert!(value(&written, "erofs_fanotify_fetched_bytes_total", &mountpoint) >= value(&after, "erofs_fanotify_fetched_bytes_total", &mountpoint));
    let names: Vec<_> = std::fs::read_dir(&dir).expect("ls").flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");

    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    // No mounts: only the HELP/TYPE lines, still valid.
    let (_, empty) = metrics();
    assert!(empty.is_empty(), "{empty:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let ft = entry.file_type().expect("file type");
        if ft.is_dir() {
            out.extend(walk(&entry.path()));
        } else if ft.is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    out
}
