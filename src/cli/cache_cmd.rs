//! `erofs-fanotify cache ls` and `cache prune [--max-size SIZE] [--unused-for DURATION]`.
//!
//! A cache entry is `<cache_dir>/<key>/{blob,bitmap,entry.json}`. It is **in use** while a live agent
//! record exists for its key (the agent serves a mount of it) or while its per-key [`AgentLock`] is held
//! (a mount is starting on it). Prune never touches such an entry: it takes the lock with `try_lock`,
//! checks the agent record under it, and removes the entry while still holding it, so no mount can start
//! on a half-removed entry. `entry.json` goes first, so an interrupted removal leaves an entry that the
//! next mount recognises as half-made and rebuilds. A pruned blob is simply refetched on its next mount.
//!
//! Which entries go is pure logic ([`plan_prune`]): unused entries older than `--unused-for`, then the
//! least recently used ones until the cache's disk usage is at most `--max-size`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use erofs_fanotify_state::{self as state, AgentLock, StateDir};

use super::CliError;

/// One cache entry as found on disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryInfo {
    pub key: String,
    pub dir: PathBuf,
    /// Logical size of the blob (from entry.json; 0 for a half-made entry).
    pub blob_size: u64,
    /// Bytes of the blob present on disk (allocated blocks of the sparse file).
    pub present_bytes: u64,
    /// Disk usage of the whole entry directory.
    pub disk_bytes: u64,
    pub last_used_unix: u64,
    pub source: Option<String>,
    pub digest: Option<String>,
    /// A live agent serves it, or a mount is starting on it.
    pub in_use: bool,
    /// No (readable) entry.json: half-made or damaged.
    pub incomplete: bool,
}

/// Lists the entries of `cache_dir` (sorted by key). A missing cache dir has none.
pub fn list_entries(cache_dir: &Path, state_dir: &StateDir) -> Result<Vec<EntryInfo>, CliError> {
    let dir = match std::fs::read_dir(cache_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CliError::new(format!("cannot read the cache dir {}: {e}", cache_dir.display()))),
    };
    let mut entries = Vec::new();
    for item in dir.flatten() {
        let Ok(key) = item.file_name().into_string() else { continue };
        if state::validate_cache_key(&key).is_err() || !item.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        entries.push(inspect_entry(cache_dir, &key, &item.path(), state_dir));
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(entries)
}

fn inspect_entry(cache_dir: &Path, key: &str, dir: &Path, state_dir: &StateDir) -> EntryInfo {
    // Through the cache dir's descriptor: an entry that is not ours reads as incomplete.
    let meta = state::CacheDir::new(cache_dir).read_entry_meta(key).ok().flatten();
    let present_bytes = allocated_bytes(&dir.join("blob"));
    let disk_bytes = dir_disk_usage(dir);
    EntryInfo {
        key: key.to_string(),
        dir: dir.to_path_buf(),
        blob_size: meta.as_ref().map_or(0, |m| m.blob_size),
        present_bytes,
        disk_bytes,
        last_used_unix: meta.as_ref().map_or(0, |m| m.last_used_unix.max(m.created_unix)),
        source: meta.as_ref().map(|m| m.source.clone()),
        digest: meta.as_ref().and_then(|m| m.digest.clone()),
        in_use: agent_alive(state_dir, key),
        incomplete: meta.is_none(),
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn dir_disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().map(|e| allocated_bytes(&e.path())).sum())
}

fn agent_alive(state_dir: &StateDir, key: &str) -> bool {
    matches!(state::read_agent_record(state_dir, key), Ok(Some(record)) if record.identity.is_alive())
}

/// The keys to remove, in removal order: unused entries not used for `unused_for`, then the least
/// recently used of the rest until the total disk usage is at most `max_size`. In-use entries count
/// towards the total but are never chosen.
pub fn plan_prune(entries: &[EntryInfo], max_size: Option<u64>, unused_for: Option<Duration>, now_unix: u64) -> Vec<String> {
    let mut candidates: Vec<&EntryInfo> = entries.iter().filter(|e| !e.in_use).collect();
    candidates.sort_by(|a, b| a.last_used_unix.cmp(&b.last_used_unix).then_with(|| a.key.cmp(&b.key)));
    let mut total: u64 = entries.iter().map(|e| e.disk_bytes).sum();
    let mut chosen = Vec::new();
    for entry in candidates {
        let stale = unused_for.is_some_and(|d| now_unix.saturating_sub(entry.last_used_unix) >= d.as_secs());
        let over = max_size.is_some_and(|max| total > max);
        if stale || over {
            total = total.saturating_sub(entry.disk_bytes);
            chosen.push(entry.key.clone());
        }
    }
    chosen
}

/// What a prune did.
#[derive(Debug, Default)]
pub struct PruneReport {
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    /// Chosen but found in use (or locked) when the time came.
    pub skipped_in_use: Vec<String>,
}

/// Removes the planned entries, each under its agent lock and only if still unused.
pub fn prune(cache_dir: &Path, state_dir: &StateDir, max_size: Option<u64>, unused_for: Option<Duration>) -> Result<PruneReport, CliError> {
    let entries = list_entries(cache_dir, state_dir)?;
    let plan = plan_prune(&entries, max_size, unused_for, state::unix_now());
    let mut report = PruneReport::default();
    for key in plan {
        let Some(entry) = entries.iter().find(|e| e.key == key) else { continue };
        let lock = match AgentLock::try_lock(state_dir, &key) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                report.skipped_in_use.push(key);
                continue;
            }
            Err(e) => return Err(CliError::new(format!("cannot lock cache entry {key}: {e}"))),
        };
        if agent_alive(state_dir, &key) {
            report.skipped_in_use.push(key);
            continue;
        }
        state::CacheDir::new(cache_dir).remove_entry(&key).map_err(|e| CliError::new(format!("cannot remove {}: {e}", entry.dir.display())))?;
        tracing::info!(key = %key, bytes = entry.disk_bytes, "pruned cache entry");
        drop(lock);
        report.freed_bytes += entry.disk_bytes;
        report.removed.push(key);
    }
    Ok(report)
}

/// `30s`, `15m`, `12h`, `7d`, `2w`, or plain seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (num, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let mult: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return None,
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult).map(Duration::from_secs)
}

/// `cache ls`
pub fn run_ls(cache_dir: &Path, json: bool) -> Result<(), CliError> {
    let entries = list_entries(cache_dir, &super::state_dir())?;
    if json {
        let text = serde_json::to_string_pretty(&entries).map_err(|e| CliError::new(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    println!("{:<40} {:>10} {:>10} {:>20} {:>6}  SOURCE", "KEY", "SIZE", "PRESENT", "LAST USED (UTC)", "IN USE");
    for e in &entries {
        let source = if e.incomplete { "(incomplete)".to_string() } else { e.source.clone().unwrap_or_default() };
        println!(
            "{:<40} {:>10} {:>10} {:>20} {:>6}  {}",
            e.key,
            human_bytes(e.blob_size),
            human_bytes(e.present_bytes),
            format_unix(e.last_used_unix),
            if e.in_use { "yes" } else { "no" },
            source
        );
    }
    Ok(())
}

/// `cache prune`
pub fn run_prune(cache_dir: &Path, max_size: Option<&str>, unused_for: Option<&str>) -> Result<(), CliError> {
    let max_size = max_size
        .map(|s| crate::mount::options::parse_size(s).ok_or_else(|| CliError::new(format!("bad size {s:?} (expected e.g. 10G)"))))
        .transpose()?;
    let unused_for = unused_for
        .map(|s| parse_duration(s).ok_or_else(|| CliError::new(format!("bad duration {s:?} (expected e.g. 7d, 12h)"))))
        .transpose()?;
    if max_size.is_none() && unused_for.is_none() {
        return Err(CliError::new("cache prune needs --max-size and/or --unused-for"));
    }
    let state_dir = super::state_dir();
    let report = prune(cache_dir, &state_dir, max_size, unused_for)?;
    for key in &report.removed {
        println!("removed {key}");
    }
    // And what agents that are gone left in the state dir (journals, old logs, locks).
    match state::sweep_agents_dir(&state_dir, &state::SweepPolicy::default(), state::unix_now()) {
        Ok(swept) if !swept.removed.is_empty() => {
            println!("removed {} files of agents that are gone ({})", swept.removed.len(), human_bytes(swept.freed_bytes))
        }
        Ok(_) => {}
        Err(e) => eprintln!("erofs-fanotify: cannot clean the state directory: {e}"),
    }
    for key in &report.skipped_in_use {
        println!("kept {key} (in use)");
    }
    println!("freed {}", human_bytes(report.freed_bytes));
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) without a date library: civil-from-days (H. Hinnant).
pub fn format_unix(secs: u64) -> String {
    if secs == 0 {
        return "never".to_string();
    }
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, disk: u64, last_used: u64, in_use: bool) -> EntryInfo {
        EntryInfo {
            key: key.into(),
            dir: PathBuf::from("/nonexistent").join(key),
            blob_size: disk,
            present_bytes: disk,
            disk_bytes: disk,
            last_used_unix: last_used,
            source: None,
            digest: None,
            in_use,
            incomplete: false,
        }
    }

    #[test]
    fn max_size_removes_oldest_unused_first() {
        let entries = vec![entry("a", 100, 30, false), entry("b", 100, 10, true), entry("c", 100, 20, false), entry("d", 100, 40, false)];
        // 400 total, cap 250: the oldest unused (c at 20, then a at 30) go; b is older but in use.
        assert_eq!(plan_prune(&entries, Some(250), None, 100), vec!["c", "a"]);
        assert_eq!(plan_prune(&entries, Some(400), None, 100), Vec::<String>::new());
        // Even a cap of zero keeps the entry in use.
        assert_eq!(plan_prune(&entries, Some(0), None, 100), vec!["c", "a", "d"]);
    }

    #[test]
    fn unused_for_removes_stale_unused_entries() {
        let entries = vec![entry("a", 1, 1000, false), entry("b", 1, 10, true), entry("c", 1, 500, false)];
        assert_eq!(plan_prune(&entries, None, Some(Duration::from_secs(600)), 1200), vec!["c"]);
    }

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("3y"), None);
        assert_eq!(format_unix(0), "never");
        assert_eq!(format_unix(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(human_bytes(1536), "1.5KiB");
    }
}
