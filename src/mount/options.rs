//! `-o` option parsing, compatible with erofs-utils' `mount.erofs -t erofs.fanotify`
//! (`oci.*` keys) plus our own keys. Pure: unit-tested without root.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::oci::OciOptions;

pub const DEFAULT_CACHE_DIR: &str = "/var/cache/erofs-fanotify";
/// Small, so a random miss fetches little; sequential streams grow their
/// read-ahead window from here (see agent::scheduler).
pub const DEFAULT_FETCH_UNIT: u64 = 256 << 10;
pub const DEFAULT_READ_AHEAD_KB: u32 = 512;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionError {
    #[error("unknown mount option {0:?}")]
    Unknown(String),
    #[error("mount option {key} needs a value")]
    MissingValue { key: String },
    #[error("bad value {value:?} for mount option {key}: {why}")]
    BadValue { key: String, value: String, why: String },
}

impl From<crate::remote::s3::S3OptionError> for OptionError {
    fn from(e: crate::remote::s3::S3OptionError) -> OptionError {
        use crate::remote::s3::S3OptionError as E;
        match e {
            E::Unknown(k) => OptionError::Unknown(k),
            E::MissingValue(key) => OptionError::MissingValue { key },
            E::BadValue { key, value, why } => OptionError::BadValue { key, value, why },
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MountOptions {
    pub cache_dir: PathBuf,
    /// Missing ranges are rounded out to this many bytes (a power of two >= 4 KiB).
    pub fetch_unit: u64,
    /// Bound for one HTTP request.
    pub fetch_timeout: Duration,
    /// Bound for one fetch including retries; afterwards readers get EIO.
    pub retry_timeout: Duration,
    /// Readahead of the mount's bdi, set before the mount becomes visible.
    pub read_ahead_kb: u32,
    /// Concurrent range requests.
    pub fetch_parallel: usize,
    /// `prefetch=all`: fetch the whole blob in the background after mounting.
    pub prefetch_all: bool,
    /// `record_trace`: record what readers ask for from the start (for `erofs-fanotify trace`).
    pub record_trace: bool,
    /// Cap of background prefetch, bytes per second.
    pub prefetch_rate: Option<u64>,
    /// A trace from `erofs-fanotify trace` to prefetch after mounting.
    pub prefetch_trace: Option<PathBuf>,
    /// A list of paths inside the image whose data is prefetched after mounting.
    pub prefetch_files: Option<PathBuf>,
    /// `cache_max=SIZE`: after mounting, prune unused cache entries (oldest first) down to SIZE on disk.
    pub cache_max: Option<u64>,
    /// `index=off|auto|require`: use the image's index artifact for the metadata ranges
    /// (`require`: never walk; a cache entry that kept its ranges needs neither).
    pub index: crate::index::IndexMode,
    /// `index_file=PATH`: an index document copied locally (instead of the registry's).
    pub index_file: Option<PathBuf>,
    /// `trace=NAME|none`: which trace of the index artifact is replayed as prefetch (default: the only one).
    pub index_trace: Option<String>,
    pub oci: OciOptions,
    /// `oci.tarindex=PATH` (erofs-utils): the layer's EROFS tar index; the
    /// layer is mounted as `[index | tar]`.
    pub tar_index: Option<PathBuf>,
    /// A bare `oci.tarindex`: make the tar index (and zinfo) at mount by
    /// streaming the layer once; kept in the cache dir for later mounts.
    pub tar_index_build: bool,
    /// `oci.zinfo=PATH` (erofs-utils): the gzip layer's zinfo, with `oci.tarindex`.
    pub zinfo: Option<PathBuf>,
    /// `oci.offline=never`: a reference whose registry cannot be reached fails the mount instead of
    /// mounting, from the cache, the blob it resolved to last (`oci.offline=fallback`, the default).
    pub oci_offline_fallback: bool,
    /// `s3.*`: the S3 source's own options (parsed by `remote::s3`).
    pub s3: crate::remote::s3::S3Options,
    /// The keys given (not defaults): a mount joining a running agent compares only these.
    pub given: std::collections::BTreeSet<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            fetch_unit: DEFAULT_FETCH_UNIT,
            fetch_timeout: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(30),
            read_ahead_kb: DEFAULT_READ_AHEAD_KB,
            fetch_parallel: 8,
            prefetch_all: false,
            record_trace: false,
            prefetch_rate: None,
            prefetch_trace: None,
            prefetch_files: None,
            cache_max: None,
            index: crate::index::IndexMode::Auto,
            index_file: None,
            index_trace: None,
            oci: OciOptions::default(),
            tar_index: None,
            tar_index_build: false,
            zinfo: None,
            oci_offline_fallback: true,
            s3: Default::default(),
            given: Default::default(),
        }
    }
}

/// Options mount(8) passes through or adds that mean nothing to us.
fn is_generic_flag(key: &str) -> bool {
    matches!(
        key,
        "ro" | "rw" | "defaults" | "auto" | "noauto" | "_netdev" | "nofail" | "nodev" | "nosuid" | "noexec"
            | "exec" | "user" | "nouser" | "users" | "relatime" | "noatime" | "sync" | "async" | "silent" | "loud"
    ) || key.starts_with("x-")
        || key == "uhelper"
        || key == "helper"
        || key == "comment"
}

impl MountOptions {
    /// Parses a comma separated option string (several `-o` may be joined by commas).
    pub fn parse(opts: &str) -> Result<MountOptions, OptionError> {
        let mut o = MountOptions::default();
        for item in opts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            o.given.insert(key.to_string());
            let need = |v: Option<&str>| -> Result<String, OptionError> {
                match v {
                    Some(v) if !v.is_empty() => Ok(v.to_string()),
                    _ => Err(OptionError::MissingValue { key: key.to_string() }),
                }
            };
            let bad = |value: &str, why: &str| OptionError::BadValue {
                key: key.to_string(),
                value: value.to_string(),
                why: why.to_string(),
            };
            match key {
                "cache_dir" => {
                    let v = need(value)?;
                    if !v.starts_with('/') {
                        return Err(bad(&v, "must be an absolute path"));
                    }
                    o.cache_dir = PathBuf::from(v);
                }
                "fetch_unit" => {
                    let v = need(value)?;
                    let n = parse_size(&v).ok_or_else(|| bad(&v, "expected a size like 1M"))?;
                    if !n.is_power_of_two() || !(4096..=(64 << 20)).contains(&n) {
                        return Err(bad(&v, "must be a power of two between 4K and 64M"));
                    }
                    o.fetch_unit = n;
                }
                "fetch_timeout" | "retry_timeout" => {
                    let v = need(value)?;
                    let secs: f64 = v.parse().map_err(|_| bad(&v, "expected seconds"))?;
                    if !(0.1..=3600.0).contains(&secs) {
                        return Err(bad(&v, "must be between 0.1 and 3600 seconds"));
                    }
                    let d = Duration::from_secs_f64(secs);
                    if key == "fetch_timeout" {
                        o.fetch_timeout = d
                    } else {
                        o.retry_timeout = d
                    }
                }
                "read_ahead_kb" => {
                    let v = need(value)?;
                    let n: u32 = v.parse().map_err(|_| bad(&v, "expected a number of KiB"))?;
                    if !(4..=16384).contains(&n) {
                        return Err(bad(&v, "must be between 4 and 16384"));
                    }
                    o.read_ahead_kb = n;
                }
                "fetch_parallel" => {
                    let v = need(value)?;
                    let n: usize = v.parse().map_err(|_| bad(&v, "expected a number"))?;
                    if !(1..=64).contains(&n) {
                        return Err(bad(&v, "must be between 1 and 64"));
                    }
                    o.fetch_parallel = n;
                }
                "prefetch" => match need(value)?.as_str() {
                    "all" => o.prefetch_all = true,
                    "none" => o.prefetch_all = false,
                    v => return Err(bad(v, "expected all or none")),
                },
                "record_trace" => {
                    if let Some(v) = value {
                        return Err(bad(v, "takes no value"));
                    }
                    o.record_trace = true;
                }
                "prefetch_rate" => {
                    let v = need(value)?;
                    o.prefetch_rate = Some(parse_size(&v).filter(|&n| n > 0).ok_or_else(|| bad(&v, "expected bytes per second like 10M"))?);
                }
                "prefetch_trace" | "prefetch_files" => {
                    let v = need(value)?;
                    if !v.starts_with('/') {
                        return Err(bad(&v, "must be an absolute path"));
                    }
                    if key == "prefetch_trace" {
                        o.prefetch_trace = Some(PathBuf::from(v));
                    } else {
                        o.prefetch_files = Some(PathBuf::from(v));
                    }
                }
                "cache_max" => {
                    let v = need(value)?;
                    o.cache_max = Some(parse_size(&v).ok_or_else(|| bad(&v, "expected a size like 20G"))?);
                }
                "index" => {
                    let v = need(value)?;
                    o.index = crate::index::IndexMode::parse(&v).ok_or_else(|| bad(&v, "expected off, auto or require"))?;
                }
                "index_file" => {
                    let v = need(value)?;
                    if !v.starts_with('/') {
                        return Err(bad(&v, "must be an absolute path"));
                    }
                    o.index_file = Some(PathBuf::from(v));
                }
                "trace" => o.index_trace = Some(need(value)?),
                "oci.blob" => o.oci.blob = Some(need(value)?),
                "oci.layer" => {
                    let v = need(value)?;
                    o.oci.layer = Some(v.parse().map_err(|_| bad(&v, "expected a layer index"))?);
                }
                "oci.platform" => o.oci.platform = Some(need(value)?),
                "oci.username" => o.oci.username = Some(need(value)?),
                "oci.password" => o.oci.password = Some(need(value)?),
                "oci.insecure" => o.oci.insecure = true,
                "oci.offline" => {
                    let v = need(value)?;
                    o.oci_offline_fallback = match v.as_str() {
                        "fallback" => true,
                        "never" => false,
                        _ => return Err(bad(&v, "expected never or fallback")),
                    };
                }
                "oci.mirror" => o.oci.mirrors.push(need(value)?),
                "oci.cafile" => {
                    let v = need(value)?;
                    if !v.starts_with('/') {
                        return Err(bad(&v, "must be an absolute path"));
                    }
                    o.oci.cafile = Some(PathBuf::from(v));
                }
                "oci.tarindex" if value.is_none() => o.tar_index_build = true,
                "oci.tarindex" => o.tar_index = Some(PathBuf::from(need(value)?)),
                "oci.zinfo" => o.zinfo = Some(PathBuf::from(need(value)?)),
                k if k.starts_with("s3.") => o.s3.set(k, value).map_err(OptionError::from)?,
                k if is_generic_flag(k) => {}
                _ => return Err(OptionError::Unknown(key.to_string())),
            }
        }
        Ok(o)
    }
}

/// Parses `4096`, `64K`, `1M`, `2G` (binary units; a trailing `B`/`iB` is accepted).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let upper = s.to_ascii_uppercase();
    let t = upper.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match t.chars().last()? {
        'K' => (&t[..t.len() - 1], 1u64 << 10),
        'M' => (&t[..t.len() - 1], 1 << 20),
        'G' => (&t[..t.len() - 1], 1 << 30),
        'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_empty() {
        assert_eq!(MountOptions::parse("").unwrap(), MountOptions::default());
        let o = MountOptions::parse("fetch_unit=256K,ro").unwrap();
        assert!(o.given.contains("fetch_unit") && !o.given.contains("cache_dir"), "{:?}", o.given);
    }

    #[test]
    fn parses_ours_and_oci_and_ignores_generic() {
        let o = MountOptions::parse(
            "rw,cache_dir=/var/tmp/c,fetch_unit=256K,fetch_timeout=2,retry_timeout=4.5,oci.insecure,oci.layer=2,_netdev,x-systemd.automount,uhelper=udisks2",
        )
        .unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/var/tmp/c"));
        assert_eq!(o.fetch_unit, 256 << 10);
        assert_eq!(o.fetch_timeout, Duration::from_secs(2));
        assert_eq!(o.retry_timeout, Duration::from_millis(4500));
        assert!(o.oci.insecure);
        assert_eq!(o.oci.layer, Some(2));
    }

    #[test]
    fn prefetch_options() {
        let o = MountOptions::parse("prefetch=all,prefetch_rate=10M,prefetch_trace=/tmp/t").unwrap();
        assert!(o.prefetch_all);
        assert_eq!(o.prefetch_rate, Some(10 << 20));
        assert_eq!(o.prefetch_trace, Some(PathBuf::from("/tmp/t")));
        assert!(MountOptions::parse("prefetch=some").is_err());
        assert!(MountOptions::parse("prefetch_trace=rel").is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(matches!(MountOptions::parse("fetch_unit=3000"), Err(OptionError::BadValue { .. })));
        assert!(matches!(MountOptions::parse("cache_dir=relative"), Err(OptionError::BadValue { .. })));
        assert!(matches!(MountOptions::parse("cache_dir"), Err(OptionError::MissingValue { .. })));
        assert_eq!(MountOptions::parse("bogus"), Err(OptionError::Unknown("bogus".into())));
        assert!(MountOptions::parse("retry_timeout=-1").is_err());
    }

    #[test]
    fn password_is_never_serialized() {
        let o = MountOptions::parse("oci.username=u,oci.password=hunter2").unwrap();
        let json = serde_json::to_string(&o.oci).unwrap();
        assert!(!json.contains("hunter2"));
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn mirrors_repeat_and_cafile_is_absolute() {
        let o = MountOptions::parse("oci.mirror=http://a:1,oci.mirror=https://b/x,oci.cafile=/etc/ca.pem").unwrap();
        assert_eq!(o.oci.mirrors, vec!["http://a:1".to_string(), "https://b/x".to_string()]);
        assert_eq!(o.oci.cafile, Some(PathBuf::from("/etc/ca.pem")));
        assert!(MountOptions::parse("oci.cafile=ca.pem").is_err());
        assert!(MountOptions::parse("oci.mirror").is_err());
        assert!(MountOptions::parse("").unwrap().oci_offline_fallback);
        assert!(!MountOptions::parse("oci.offline=never").unwrap().oci_offline_fallback);
        assert!(MountOptions::parse("oci.offline=fallback").unwrap().oci_offline_fallback);
        assert!(MountOptions::parse("oci.offline=sometimes").is_err());
    }

    #[test]
    fn tar_index_options_take_paths() {
        let o = MountOptions::parse("oci.tarindex=/i/layer.erofs,oci.zinfo=rel/layer.zinfo").unwrap();
        assert_eq!(o.tar_index, Some(PathBuf::from("/i/layer.erofs")));
        assert_eq!(o.zinfo, Some(PathBuf::from("rel/layer.zinfo")));
        assert!(matches!(MountOptions::parse("oci.tarindex="), Err(OptionError::MissingValue { .. })));
        let o = MountOptions::parse("oci.tarindex").unwrap();
        assert!(o.tar_index_build && o.tar_index.is_none());
    }

    #[test]
    fn s3_keys_go_to_the_s3_options() {
        let o = MountOptions::parse("s3.endpoint=http://127.0.0.1:9000,s3.endpoint=http://127.0.0.1:9001,s3.region=eu-west-1,s3.urlstyle=path,s3.sig=4").unwrap();
        assert_eq!(o.s3.endpoints.len(), 2);
        assert_eq!(o.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(MountOptions::parse("s3.nope=1"), Err(OptionError::Unknown("s3.nope".into())));
        assert!(matches!(MountOptions::parse("s3.sig=5"), Err(OptionError::BadValue { .. })));
    }

    #[test]
    fn index_options() {
        use crate::index::IndexMode;
        assert_eq!(MountOptions::default().index, IndexMode::Auto);
        let o = MountOptions::parse("index=require,index_file=/tmp/doc.json").unwrap();
        assert_eq!((o.index, o.index_file), (IndexMode::Require, Some(PathBuf::from("/tmp/doc.json"))));
        assert_eq!(MountOptions::parse("index=off").unwrap().index, IndexMode::Off);
        assert!(matches!(MountOptions::parse("index=yes"), Err(OptionError::BadValue { .. })));
        assert!(MountOptions::parse("index_file=rel.json").is_err());
        assert_eq!(MountOptions::parse("trace=python").unwrap().index_trace.as_deref(), Some("python"));
        assert!(MountOptions::parse("trace").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999T"), None);
    }
}
