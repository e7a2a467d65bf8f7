//! Deterministic source trees and their EROFS images.
//!
//! A tree is generated from a `Spec` by a seeded PRNG (splitmix64, no extra crates), so the same spec always
//! gives the same bytes. It holds: thousands of small files (sizes around the 4 KiB block edges, inline
//! tails, up to a few hundred KiB) spread over many directories, one flat directory with >1000 entries
//! (multi-block directory data), a few big files (random, text, mixed, zeros, odd sizes), a deep chain of
//! directories (depth >= 40), files and directories with `user.*` xattrs (inline, shared, binary, empty
//! values, many per file), symlinks (relative, absolute, dangling, long, to directories), hard links, empty
//! files and directories, unusual modes (setuid, sticky, 0400) and owners, long and non-ASCII names.
//! About half the data is text, so lz4 compression really matters; the rest is random.
//!
//! Each tree is built into a plain image (`mkfs.erofs`) and an lz4 one (`mkfs.erofs -zlz4`).
//!
//! Cache: fixtures live under `$CARGO_TARGET_TMPDIR/fixtures/<name>-<key>/` (`tree/`, `plain.erofs`,
//! `lz4.erofs`, digests), where `<key>` hashes this file's source, the spec and the mkfs.erofs binary.
//! They are built once, under an flock, and reused by every test binary and by later runs; changing the
//! generator (this file) or erofs-utils rebuilds them and removes the old ones. `cargo clean` removes them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use super::MIB;

const GENERATOR_SOURCE: &str = include_str!("fixtures.rs");

/// How a file's bytes are generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Random,
    /// Words and newlines: compresses well.
    Text,
    /// 64 KiB runs of random, text and zeros.
    Mixed,
    Zeros,
}

#[derive(Debug)]
struct Spec {
    name: &'static str,
    seed: u64,
    top_dirs: usize,
    sub_dirs: usize,
    /// Small files spread over the top and sub directories.
    spread_files: usize,
    /// Tiny files in the one flat directory.
    flat_files: usize,
    big_files: &'static [(&'static str, u64, Fill)],
    deep_depth: usize,
    /// The generated tree must hold at least this many bytes of file data.
    min_total: u64,
}

const LARGE: Spec = Spec {
    name: "large",
    seed: 0x5eed_0000_0000_0001,
    top_dirs: 30,
    sub_dirs: 5,
    spread_files: 4500,
    flat_files: 1500,
    big_files: &[
        ("random-16m", 16 * MIB, Fill::Random),
        ("text-24m", 24 * MIB, Fill::Text),
        ("mixed-odd", 6 * MIB + 12345, Fill::Mixed),
        ("zeros-2m", 2 * MIB, Fill::Zeros),
        ("random-odd", MIB + 1, Fill::Random),
    ],
    deep_depth: 48,
    min_total: 100 * MIB,
};

const SMALL: Spec = Spec {
    name: "small",
    seed: 0x5eed_0000_0000_0002,
    top_dirs: 4,
    sub_dirs: 2,
    spread_files: 250,
    flat_files: 100,
    big_files: &[
        ("random-3m", 3 * MIB, Fill::Random),
        ("text-2m", 2 * MIB, Fill::Text),
        ("mixed-odd", MIB + 777, Fill::Mixed),
    ],
    deep_depth: 42,
    min_total: 0,
};

/// An EROFS image file.
#[derive(Debug, Clone)]
pub struct Image {
    pub path: PathBuf,
    /// `sha256:<hex>`
    pub digest: String,
    pub size: u64,
}

/// A regular file of a tree.
#[derive(Debug, Clone)]
pub struct FileEntry {
    /// Relative to the tree root.
    pub rel: PathBuf,
    pub size: u64,
}

#[derive(Debug)]
pub struct Fixture {
    pub name: &'static str,
    pub dir: PathBuf,
    pub tree: PathBuf,
    pub plain: Image,
    pub lz4: Image,
    /// Bytes of regular-file data in the tree.
    pub tree_bytes: u64,
    files: OnceLock<Vec<FileEntry>>,
}

/// The >= 100 MiB tree (thousands of files).
pub fn large() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| build(&LARGE))
}

/// A ~10 MiB tree with the same kinds of entries, for tests that are not about scale.
pub fn small() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| build(&SMALL))
}

impl Fixture {
    /// Every regular file, sorted by path (hard links listed under each name).
    pub fn files(&self) -> &[FileEntry] {
        self.files.get_or_init(|| {
            let mut files = Vec::new();
            collect_files(&self.tree, Path::new(""), &mut files);
            files.sort_by(|a, b| a.rel.cmp(&b.rel));
            files
        })
    }

    pub fn source(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.tree.join(rel)
    }

    pub fn read_source(&self, rel: impl AsRef<Path>) -> Vec<u8> {
        let path = self.source(rel);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// `n` files of 4 KiB < size <= 32 KiB from different top-level `dirNN` directories (deterministic).
    pub fn small_files(&self, n: usize) -> Vec<FileEntry> {
        let mut seen_dirs = Vec::new();
        let mut picked = Vec::new();
        for f in self.files() {
            let top = f.rel.components().next().map(|c| c.as_os_str().to_owned());
            let Some(top) = top else { continue };
            if !top.to_string_lossy().starts_with("dir") || f.size <= 4096 || f.size > 32 * 1024 {
                continue;
            }
            if seen_dirs.contains(&top) {
                continue;
            }
            seen_dirs.push(top);
            picked.push(f.clone());
            if picked.len() == n {
                break;
            }
        }
        assert_eq!(
            picked.len(),
            n,
            "fixture {} has too few small files in distinct dirs",
            self.name
        );
        picked
    }

    /// The files under `big/`.
    pub fn big_files(&self) -> Vec<FileEntry> {
        self.files()
            .iter()
            .filter(|f| f.rel.starts_with("big"))
            .cloned()
            .collect()
    }

    pub fn file(&self, rel: impl AsRef<Path>) -> FileEntry {
        let rel = rel.as_ref();
        self.files()
            .iter()
            .find(|f| f.rel == rel)
            .cloned()
            .unwrap_or_else(|| panic!("fixture {} has no file {}", self.name, rel.display()))
    }
}

fn collect_files(root: &Path, rel: &Path, out: &mut Vec<FileEntry>) {
    let dir = root.join(rel);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("dir entry");
        let meta = entry.path().symlink_metadata().expect("lstat");
        let child = rel.join(entry.file_name());
        if meta.is_dir() {
            collect_files(root, &child, out);
        } else if meta.is_file() {
            out.push(FileEntry {
                rel: child,
                size: meta.len(),
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Building and caching

fn build(spec: &Spec) -> Fixture {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&root).expect("fixtures dir");
    let key = cache_key(spec);
    let dir = root.join(format!("{}-{key}", spec.name));
    let _lock = FileLock::exclusive(&root.join(".lock"));
    if !dir.join("COMPLETE").exists() {
        remove_outdated(&root, spec.name, &dir);
        let scratch = root.join(format!(".build-{}-{key}", spec.name));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).expect("fixture scratch dir");
        let started = std::time::Instant::now();
        let tree = scratch.join("tree");
        let total = generate(spec, &tree);
        assert!(
            total >= spec.min_total,
            "fixture {} has {total} bytes, wants >= {}",
            spec.name,
            spec.min_total
        );
        for (image, compression) in [("plain.erofs", None), ("lz4.erofs", Some("lz4"))] {
            let image = scratch.join(image);
            mkfs(&image, &tree, compression);
            let digest = super::registry::sha256_file(&image);
            std::fs::write(image.with_extension("erofs.sha256"), digest).expect("write digest");
        }
        std::fs::write(scratch.join("tree-bytes"), total.to_string()).expect("write tree-bytes");
        std::fs::write(scratch.join("COMPLETE"), format!("{spec:#?}\n")).expect("write COMPLETE");
        std::fs::rename(&scratch, &dir).expect("move fixture into place");
        eprintln!(
            "built fixture {} ({total} bytes) in {:.1?}",
            spec.name,
            started.elapsed()
        );
    }
    let image = |name: &str| {
        let path = dir.join(name);
        let hex =
            std::fs::read_to_string(path.with_extension("erofs.sha256")).expect("read digest");
        let size = std::fs::metadata(&path).expect("image metadata").len();
        Image {
            path,
            digest: format!("sha256:{}", hex.trim()),
            size,
        }
    };
    Fixture {
        name: spec.name,
        tree: dir.join("tree"),
        plain: image("plain.erofs"),
        lz4: image("lz4.erofs"),
        tree_bytes: std::fs::read_to_string(dir.join("tree-bytes"))
            .expect("tree-bytes")
            .trim()
            .parse()
            .expect("number"),
        dir,
        files: OnceLock::new(),
    }
}

fn cache_key(spec: &Spec) -> String {
    let mut hasher = Sha256::new();
    hasher.update(GENERATOR_SOURCE.as_bytes());
    hasher.update(format!("{spec:?}").as_bytes());
    let mkfs = which("mkfs.erofs");
    hasher.update(std::fs::read(&mkfs).unwrap_or_else(|e| panic!("read {}: {e}", mkfs.display())));
    hex::encode(hasher.finalize())[..16].to_string()
}

fn which(tool: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists());
    found.unwrap_or_else(|| panic!("{tool} not found"))
}

/// Removes other versions of this fixture and abandoned builds (we hold the lock: nobody is building).
fn remove_outdated(root: &Path, name: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let ours = file_name.starts_with(&format!("{name}-"))
            || file_name.starts_with(&format!(".build-{name}-"));
        if ours && entry.path() != keep {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn mkfs(image: &Path, tree: &Path, compression: Option<&str>) {
    let mut cmd = Command::new("mkfs.erofs");
    // Fixed timestamps and UUID make the images reproducible.
    cmd.args([
        "--quiet",
        "-T0",
        "-U",
        "6b1d8bdf-1f34-4a51-a3e9-1c5e1c2f5e01",
    ]);
    if let Some(c) = compression {
        cmd.arg(format!("-z{c}"));
    }
    cmd.arg(image).arg(tree);
    let out = cmd.output().expect("run mkfs.erofs");
    assert!(
        out.status.success(),
        "mkfs.erofs {compression:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

struct FileLock(std::fs::File);

impl FileLock {
    fn exclusive(path: &Path) -> FileLock {
        use std::os::unix::io::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .expect("lock file");
        // SAFETY: flock on an fd we own; blocks until the lock is ours. Released when the file closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        FileLock(file)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Generation

/// splitmix64: tiny, fast, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    Rng::new(seed).fill(&mut buf);
    buf
}

const WORDS: &[&str] = &[
    "erofs",
    "fanotify",
    "blob",
    "registry",
    "layer",
    "manifest",
    "digest",
    "range",
    "cache",
    "bitmap",
    "mount",
    "agent",
    "inode",
    "extent",
    "block",
    "page",
    "event",
    "fetch",
    "lazy",
    "image",
    "container",
    "kernel",
    "superblock",
    "directory",
    "symlink",
    "xattr",
    "compress",
    "lz4",
    "cluster",
    "readahead",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "0",
    "1",
    "42",
    "4096",
    "65536",
    "0xdeadbeef",
    "{",
    "}",
    "(",
    ")",
    ";",
    "=>",
    "fn",
    "let",
    "mut",
];

fn fill_chunk(rng: &mut Rng, fill: Fill, buf: &mut [u8]) {
    match fill {
        Fill::Random => rng.fill(buf),
        Fill::Zeros => buf.fill(0),
        Fill::Text => {
            let mut i = 0;
            while i < buf.len() {
                let word = rng.pick(WORDS).as_bytes();
                let n = word.len().min(buf.len() - i);
                buf[i..i + n].copy_from_slice(&word[..n]);
                i += n;
                if i < buf.len() {
                    buf[i] = if rng.below(12) == 0 { b'\n' } else { b' ' };
                    i += 1;
                }
            }
        }
        Fill::Mixed => {
            for run in buf.chunks_mut(64 * 1024) {
                let kind = [Fill::Random, Fill::Text, Fill::Zeros][rng.below(3) as usize];
                fill_chunk(rng, kind, run);
            }
        }
    }
}

fn write_file(path: &Path, size: u64, fill: Fill, rng: &mut Rng) -> u64 {
    use std::io::Write;
    let file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut out = std::io::BufWriter::with_capacity(MIB as usize, file);
    let mut left = size;
    let mut buf = vec![0u8; (size.min(MIB)) as usize];
    while left > 0 {
        let n = left.min(MIB) as usize;
        fill_chunk(rng, fill, &mut buf[..n]);
        out.write_all(&buf[..n]).expect("write fixture file");
        left -= n as u64;
    }
    out.flush().expect("flush fixture file");
    size
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let cpath = CString::new(path.as_os_str().as_bytes()).expect("path");
    let cname = CString::new(name).expect("name");
    // SAFETY: valid NUL-terminated strings and a value slice alive for the call.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn mkdir(path: &Path) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

fn small_size(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..=24 => rng.below(129),
        25..=64 => 129 + rng.below(4096 - 129),
        65..=94 => 4096 + rng.below(36 * 1024),
        _ => 40 * 1024 + rng.below(260 * 1024),
    }
}

/// A few xattrs: per-file values, one value shared by many inodes (EROFS shared xattrs), binary, empty.
fn decorate_xattrs(path: &Path, i: u64, rng: &mut Rng) {
    set_xattr(path, "user.test.id", format!("entry-{i}").as_bytes());
    set_xattr(path, "user.shared", b"one value used by many inodes");
    if rng.below(3) == 0 {
        let mut blob = vec![0u8; 1 + rng.below(200) as usize];
        rng.fill(&mut blob);
        set_xattr(path, "user.binary", &blob);
    }
    if rng.below(5) == 0 {
        set_xattr(path, "user.empty", b"");
    }
}

/// Writes the tree for `spec` under `root` (which must not exist); returns the bytes of file data.
fn generate(spec: &Spec, root: &Path) -> u64 {
    let mut rng = Rng::new(spec.seed);
    let mut total = 0u64;
    mkdir(root);
    set_mode(root, 0o755);

    // Small files over top dirs and their subdirs.
    let mut dirs = Vec::new();
    for t in 0..spec.top_dirs {
        let top = PathBuf::from(format!("dir{t:02}"));
        dirs.push(top.clone());
        for s in 0..spec.sub_dirs {
            dirs.push(top.join(format!("sub{s}")));
        }
    }
    for d in &dirs {
        mkdir(&root.join(d));
    }
    const EXTS: &[&str] = &[".txt", ".bin", ".dat", "", ".json", ".so.1"];
    const FILE_MODES: &[u32] = &[0o644, 0o644, 0o644, 0o600, 0o755, 0o444, 0o640];
    for i in 0..spec.spread_files as u64 {
        let dir = rng.pick(&dirs).clone();
        let path = root.join(dir).join(format!("file{i:05}{}", rng.pick(EXTS)));
        let size = small_size(&mut rng);
        let fill = if rng.below(2) == 0 {
            Fill::Text
        } else {
            Fill::Random
        };
        total += write_file(&path, size, fill, &mut rng);
        set_mode(&path, *rng.pick(FILE_MODES));
        if rng.below(10) == 0 {
            decorate_xattrs(&path, i, &mut rng);
        }
        match rng.below(40) {
            0 => chown(&path, 1000, 1000),
            1 => chown(&path, 65534, 65534),
            _ => {}
        }
    }
    const DIR_MODES: &[u32] = &[0o755, 0o755, 0o750, 0o700, 0o775];
    for (i, d) in dirs.iter().enumerate() {
        let path = root.join(d);
        set_mode(&path, *rng.pick(DIR_MODES));
        if i % 4 == 0 {
            decorate_xattrs(&path, 100_000 + i as u64, &mut rng);
        }
    }

    // One flat directory with many entries of varied name lengths: its data spans many blocks.
    let flat = root.join("flat");
    mkdir(&flat);
    for i in 0..spec.flat_files as u64 {
        let pad = "x".repeat(rng.below(40) as usize);
        let path = flat.join(format!("entry-{i:05}-{}{pad}", rng.pick(WORDS)));
        let size = rng.below(2049);
        total += write_file(&path, size, Fill::Text, &mut rng);
    }

    // Big files.
    let big = root.join("big");
    mkdir(&big);
    for (name, size, fill) in spec.big_files {
        total += write_file(&big.join(name), *size, *fill, &mut rng);
    }

    // Sizes around block and page edges.
    let edges = root.join("edges");
    mkdir(&edges);
    for size in [
        1u64, 4095, 4096, 4097, 8191, 8192, 8193, 12289, 65535, 65536, 65537, 131_172,
    ] {
        total += write_file(
            &edges.join(format!("rand-{size}")),
            size,
            Fill::Random,
            &mut rng,
        );
        total += write_file(
            &edges.join(format!("text-{size}")),
            size,
            Fill::Text,
            &mut rng,
        );
    }

    // A deep chain of directories.
    let mut level = root.join("deep");
    mkdir(&level);
    for depth in 0..spec.deep_depth {
        level = level.join(format!("level-{depth:02}"));
        mkdir(&level);
        let size = 100 + rng.below(3000);
        total += write_file(&level.join("file.txt"), size, Fill::Text, &mut rng);
        if depth % 7 == 0 {
            decorate_xattrs(&level, 200_000 + depth as u64, &mut rng);
        }
        if depth % 5 == 0 {
            std::os::unix::fs::symlink("..", level.join("up")).expect("symlink up");
        }
    }
    total += write_file(&level.join("leaf.bin"), 200 * 1024, Fill::Random, &mut rng);
    total += write_file(&level.join("leaf.txt"), 50 * 1024 + 3, Fill::Text, &mut rng);

    // Special entries.
    let special = root.join("special");
    mkdir(&special.join("sub"));
    mkdir(&special.join("empty-dir"));
    total += write_file(&special.join("empty-a"), 0, Fill::Zeros, &mut rng);
    total += write_file(&special.join("empty-b"), 0, Fill::Zeros, &mut rng);
    set_mode(&special.join("empty-b"), 0o600);
    total += write_file(&special.join("sub/empty-c"), 0, Fill::Zeros, &mut rng);
    let first_big = spec.big_files[0].0;
    let links: &[(&str, String)] = &[
        ("link-rel", format!("../big/{first_big}")),
        ("link-dir", "../deep".into()),
        ("link-abs", "/etc/hostname".into()),
        ("link-dangling", "does/not/exist".into()),
        ("link-to-link", "link-rel".into()),
        (
            "link-long",
            (0..100)
                .map(|i| format!("d{i:03}"))
                .collect::<Vec<_>>()
                .join("/")
                + "/end",
        ),
    ];
    for (name, target) in links {
        std::os::unix::fs::symlink(target, special.join(name)).expect("symlink");
    }
    chown(&special.join("link-rel"), 1000, 1000);
    total += write_file(&special.join("hard-a"), 10 * 1024, Fill::Random, &mut rng);
    std::fs::hard_link(special.join("hard-a"), special.join("hard-b")).expect("hard link");
    total += write_file(&special.join("setuid"), 3000, Fill::Random, &mut rng);
    set_mode(&special.join("setuid"), 0o4755);
    let sticky = special.join("sticky-dir");
    mkdir(&sticky);
    total += write_file(&sticky.join("inside"), 5000, Fill::Text, &mut rng);
    set_mode(&sticky, 0o1777);
    total += write_file(&special.join("owned-1000"), 7000, Fill::Text, &mut rng);
    chown(&special.join("owned-1000"), 1000, 1000);
    total += write_file(&special.join("owned-nobody"), 100, Fill::Text, &mut rng);
    chown(&special.join("owned-nobody"), 65534, 65534);
    total += write_file(&special.join("read-only"), 4096, Fill::Random, &mut rng);
    set_mode(&special.join("read-only"), 0o400);
    let many = special.join("many-xattrs");
    total += write_file(&many, 20_000, Fill::Text, &mut rng);
    for i in 0..24u64 {
        let mut value = vec![0u8; (i * 37 % 150) as usize];
        fill_chunk(&mut rng, Fill::Text, &mut value);
        set_xattr(&many, &format!("user.attr{i:02}"), &value);
    }
    set_xattr(
        &many,
        &format!("user.long-{}", "n".repeat(100)),
        b"long name",
    );
    let big_value = special.join("xattr-big-value");
    total += write_file(&big_value, 100, Fill::Text, &mut rng);
    let mut value = vec![0u8; 1000];
    rng.fill(&mut value);
    set_xattr(&big_value, "user.big", &value);
    set_xattr(&special.join("empty-dir"), "user.on-empty-dir", b"yes");
    // 254, not 255: mkfs.erofs 1.5 fails with ENOENT on a 255-byte name.
    total += write_file(&special.join("L".repeat(254)), 1234, Fill::Text, &mut rng);
    total += write_file(
        &special.join("ünïcødé-名前.txt"),
        4321,
        Fill::Text,
        &mut rng,
    );
    total += write_file(&special.join("name with spaces"), 42, Fill::Text, &mut rng);

    total
}
