//! `erofs-fanotify build` round trips through real kernel mounts and Debian's fsck.erofs: a directory
//! tree with every file type, owner, mtime (ns), xattr kind, hard links, a > 4 GiB sparse file and a
//! directory of thousands of entries; the same with lz4; the same from a tar (compared with `tar -x`);
//! reproducible builds; tar indexes mounted through the flat address space; metadata in one range.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cmd;
use common::env::{mount_erofs_file, PlainMount};
use common::erofs_tree::{assert_same_tree, Checks};
use common::Need;
use erofs_fanotify::erofs::{walk, MetaReader, WalkError, WalkLimits};

fn ready() -> bool {
    common::require(&[Need::Root, Need::Kernel, Need::MkfsErofs, Need::Tools])
}

fn work_dir(name: &str) -> tempfile::TempDir {
    std::fs::create_dir_all(common::env::TEST_ROOT_BASE).unwrap();
    tempfile::Builder::new().prefix(&format!("{name}-")).tempdir_in(common::env::TEST_ROOT_BASE).unwrap()
}

fn run_ok(c: &mut Command) -> String {
    let out = cmd::run(c, Duration::from_secs(600));
    out.assert_success();
    out.stdout_str()
}

fn build(args: &[&str]) -> String {
    run_ok(Command::new(common::EROFS_FANOTIFY).arg("build").args(args))
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(sec, nsec);
    utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) {
    nix::sys::stat::mknod(path, kind, nix::sys::stat::Mode::from_bits_truncate(0o640), nix::sys::stat::makedev(major, minor)).unwrap();
}

/// A POSIX ACL xattr value (version 2): user::rw-, user:1234:r--, group::r--, mask::r--, other::---.
fn acl_value() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [(1u16, 6u16, u32::MAX), (2, 4, 1234), (4, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// security.capability v2: cap_net_bind_service (10) permitted and effective.
fn cap_value() -> Vec<u8> {
    let mut v = (0x0200_0000u32 | 1).to_le_bytes().to_vec();
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// The source tree with every case the writer must carry. `with_sparse` adds a 5 GiB sparse file.
fn make_tree(root: &Path, with_sparse: bool) {
    use nix::sys::stat::SFlag;
    let w = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).unwrap();
    let chmod = |p: &str, m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    let chown = |p: &str, u: u32, g: u32| {
        std::os::unix::fs::lchown(root.join(p), Some(u), Some(g)).unwrap();
    };
    for d in ["etc", "many", "deep/a/b/c", "acl-dir", "empty-dir"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    w("empty", b"");
    w("tiny", b"hello\n");
    w("one-block", &common::fixtures::random_bytes(1, 4096));
    w("two-blocks-and-a-bit", &common::fixtures::random_bytes(2, 8193));
    let text: Vec<u8> = (0..200_000u32).flat_map(|i| format!("line {i} of some text\n").into_bytes()).collect();
    w("etc/text", &text);
    w("etc/random", &common::fixtures::random_bytes(3, 300_000));
    w("deep/a/b/c/leaf", b"leaf");
    std::fs::hard_link(root.join("tiny"), root.join("etc/tiny-link")).unwrap();
    std::fs::hard_link(root.join("tiny"), root.join("deep/tiny-link2")).unwrap();
    std::os::unix::fs::symlink("tiny", root.join("short-link")).unwrap();
    std::os::unix::fs::symlink("x".repeat(4095), root.join("long-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    mknod(&root.join("char"), SFlag::S_IFCHR, 1, 3);
    mknod(&root.join("block"), SFlag::S_IFBLK, 259, 70000);
    mknod(&root.join("whiteout"), SFlag::S_IFCHR, 0, 0);
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap());
    for i in 0..3000 {
        w(&format!("many/entry-{i:05}-with-a-longer-name"), format!("{i}").as_bytes());
    }
    if with_sparse {
        let f = std::fs::File::create(root.join("sparse")).unwrap();
        f.set_len(5 << 30).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"end", (5 << 30) - 3).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"start", 0).unwrap();
    }
    chmod("etc/text", 0o4755);
    chmod("one-block", 0o2640);
    chmod("empty-dir", 0o1777);
    chown("etc/random", 70000, 80000);
    chown("one-block", 1000, 100);
    chown("short-link", 42, 43);
    xattr::set(root.join("tiny"), "user.comment", b"a small file").unwrap();
    xattr::set(root.join("tiny"), "trusted.overlay.thing", b"t").unwrap();
    xattr::set(root.join("etc/text"), "security.capability", &cap_value()).unwrap();
    xattr::set(root.join("acl-dir"), "system.posix_acl_access", &acl_value()).unwrap();
    xattr::set(root.join("acl-dir"), "system.posix_acl_default", &acl_value()).unwrap();
    for i in 0..50 {
        // Shared: the same label on many files.
        xattr::set(root.join(format!("many/entry-{i:05}-with-a-longer-name")), "user.label", b"shared-label").unwrap();
    }
    xattr::set(root.join("etc/random"), "user.big", &vec![b'v'; 3000]).unwrap();
    // Times last, deepest first (creating entries changes directory mtimes).
    let mut all = Vec::new();
    collect(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, 1_600_000_000 + (i as i64 % 7) * 1000, (i as i64 * 7919) % 1_000_000_000);
    }
    set_mtime(&root.join("tiny"), 1_700_000_000, 0);
    set_mtime(root, 1_650_000_000, 123_456_789);
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            collect(&p, out);
        }
        out.push(p);
    }
}

struct FileMeta(std::fs::File);
impl MetaReader for FileMeta {
    fn prefetch(&mut self, _: &[std::ops::Range<u64>]) -> Result<(), WalkError> {
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset).map_err(|e| WalkError::Io(e.to_string()))
    }
}

/// The byte ranges a lazy mount must have before mounting, by our walker.
fn required_ranges(image: &Path) -> Vec<std::ops::Range<u64>> {
    let f = std::fs::File::open(image).unwrap();
    let size = f.metadata().unwrap().len();
    walk(&mut FileMeta(f), size, &WalkLimits::default()).unwrap().required
}

fn fsck(image: &Path, extract: Option<&Path>) {
    let mut c = Command::new("fsck.erofs");
    if let Some(dir) = extract {
        c.arg(format!("--extract={}", dir.display()));
    }
    run_ok(c.arg(image));
}

fn mount(image: &Path, at: &Path) -> PlainMount {
    mount_erofs_file(image, at).unwrap();
    PlainMount(at.to_path_buf())
}

/// Checks of fsck.erofs 1.5 extraction: names, types, sizes, bytes, device numbers and symlink
/// targets (1.5 restores neither owners, setuid bits, xattrs nor hard links), except the file with
/// holes (1.5 extracts chunk holes wrongly, though it accepts the image; fsck.erofs 1.9 and the
/// kernel read them right, and the mount below checks it byte for byte).
fn extract_checks() -> Checks {
    Checks { owner: false, mtime: false, xattrs: false, dir_mtime: false, mode: false, links: false, skip_content: &["sparse"] }
}

#[test]
#[ignore = "needs root + kernel + erofs-utils"]
fn directory_tree_round_trips_plain_and_lz4() {
    if !ready() {
        return;
    }
    let work = work_dir("writer-dir");
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, true);
    for (name, extra) in [("plain", &[][..]), ("lz4", &["--compress", "lz4"][..])] {
        let image = work.path().join(format!("{name}.erofs"));
        let mut args: Vec<&str> = extra.to_vec();
        let (s, i) = (src.to_str().unwrap(), image.to_str().unwrap());
        args.extend([s, i]);
        let out = build(&args);
        eprintln!("{name}: {out}");
        let end = common::built_metadata_end(&out);
        assert_eq!(required_ranges(&image), vec![0..end.next_multiple_of(4096)], "{name}: metadata is one range");
        fsck(&image, None);
        let x = work.path().join(format!("{name}-extract"));
        fsck(&image, Some(&x));
        assert_same_tree(&src, &x, extract_checks());
        std::fs::remove_dir_all(&x).unwrap();
        let mnt = work.path().join(format!("{name}-mnt"));
        let guard = mount(&image, &mnt);
        assert_same_tree(&src, &mnt, Checks::all());
        // Hard links are one inode in the image too.
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(mnt.join("tiny")).unwrap();
        let b = std::fs::metadata(mnt.join("deep/tiny-link2")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 3));
        drop(guard);
        if name == "lz4" {
            let plain = std::fs::metadata(work.path().join("plain.erofs")).unwrap().len();
            let lz4 = std::fs::metadata(&image).unwrap().len();
            assert!(lz4 < plain, "lz4 image {lz4} not smaller than plain {plain}");
        }
    }
}

#[test]
#[ignore = "needs root + kernel + erofs-utils"]
fn builds_are_reproducible() {
    if !ready() {
        return;
    }
    let work = work_dir("writer-repro");
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, false);
    let digest = |p: &Path| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
    };
    for extra in [&[][..], &["--compress", "lz4"][..]] {
        let (a, b) = (work.path().join("a.erofs"), work.path().join("b.erofs"));
        for img in [&a, &b] {
            let mut args: Vec<&str> = extra.to_vec();
            args.extend(["--reproducible", src.to_str().unwrap(), img.to_str().unwrap()]);
            build(&args);
        }
        assert_eq!(digest(&a), digest(&b), "two --reproducible builds of one tree ({extra:?})");
    }
    // Without --reproducible the UUID is random.
    let (c, d) = (work.path().join("c.erofs"), work.path().join("d.erofs"));
    build(&[src.to_str().unwrap(), c.to_str().unwrap()]);
    build(&[src.to_str().unwrap(), d.to_str().unwrap()]);
    assert_ne!(digest(&c), digest(&d));
}

/// A PAX tar of `src` made by Python's tarfile (xattrs as SCHILY.xattr, binary values kept).
fn make_tar(src: &Path, out: &Path) {
    let script = r#"
import os, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
def fix(ti):
    p = os.path.join(src, ti.name)
    hdrs = {}
    try:
        for n in os.listxattr(p, follow_symlinks=False):
            hdrs['SCHILY.xattr.' + n] = os.getxattr(p, n, follow_symlinks=False).decode('utf-8', 'surrogateescape')
    except OSError:
        pass
    st = os.lstat(p)
    hdrs['mtime'] = '%d.%09d' % (st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9)
    ti.pax_headers = hdrs
    return ti
with tarfile.open(out, 'w', format=tarfile.PAX_FORMAT) as t:
    for name in sorted(os.listdir(src)):
        if name == 'socket':
            continue
        t.add(os.path.join(src, name), arcname=name, filter=fix)
"#;
    run_ok(Command::new("python3").arg("-c").arg(script).arg(src).arg(out));
}

#[test]
#[ignore = "needs root + kernel + erofs-utils"]
fn tar_input_round_trips_and_tar_index_mounts_flatdev() {
    if !ready() {
        return;
    }
    let work = work_dir("writer-tar");
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, false);
    let tar = work.path().join("layer.tar");
    make_tar(&src, &tar);
    let expected = work.path().join("expected");
    std::fs::create_dir(&expected).unwrap();
    run_ok(Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-xf"]).arg(&tar).arg("-C").arg(&expected));
    // tar -x leaves the root's own metadata alone: give it the source's.
    let st = std::fs::metadata(&src).unwrap();
    use std::os::unix::fs::MetadataExt;
    let gz = work.path().join("layer.tar.gz");
    run_ok(Command::new("sh").arg("-c").arg(format!("gzip -c {} > {}", tar.display(), gz.display())));
    let checks = Checks { dir_mtime: false, ..Checks::all() };
    for (name, input, extra) in [
        ("tar", tar.clone(), &[][..]),
        ("targz-lz4", gz.clone(), &["--compress", "lz4"][..]),
    ] {
        let image = work.path().join(format!("{name}.erofs"));
        let mut args: Vec<&str> = extra.to_vec();
        args.extend([input.to_str().unwrap(), image.to_str().unwrap()]);
        let out = build(&args);
        assert_eq!(required_ranges(&image), vec![0..common::built_metadata_end(&out).next_multiple_of(4096)]);
        fsck(&image, None);
        let mnt = work.path().join(format!("{name}-mnt"));
        let _m = mount(&image, &mnt);
        let _ = st.mode();
        assert_same_tree(&expected, &mnt, Checks { owner: true, ..checks });
    }
    // stdin, gzip sniffed.
    let image = work.path().join("stdin.erofs");
    let script = format!("{} build - {} < {}", common::EROFS_FANOTIFY, image.display(), gz.display());
    run_ok(Command::new("sh").arg("-c").arg(script));
    {
        let mnt = work.path().join("stdin-mnt");
        let _m = mount(&image, &mnt);
        assert_same_tree(&expected, &mnt, checks);
    }

    // Tar index: backing file [index | tar] with the tar at uniaddr * 512, no device= option.
    let index = work.path().join("index.erofs");
    let out = build(&["--tar-index", tar.to_str().unwrap(), index.to_str().unwrap()]);
    let idx = std::fs::read(&index).unwrap();
    assert_eq!(idx[1024 + 12], 9, "512-byte blocks");
    let slot = u16::from_le_bytes([idx[1024 + 88], idx[1024 + 89]]) as usize * 128;
    let blocks = u32::from_le_bytes(idx[slot + 64..slot + 68].try_into().unwrap()) as u64;
    let uniaddr = u32::from_le_bytes(idx[slot + 68..slot + 72].try_into().unwrap()) as u64;
    assert_eq!(uniaddr * 512, idx.len() as u64, "the tar follows the index: {out}");
    let tar_len = std::fs::metadata(&tar).unwrap().len();
    assert!(blocks * 512 <= tar_len && blocks * 512 + 10240 >= tar_len);
    assert_eq!(required_ranges(&index), vec![0..idx.len() as u64]);
    let backing = work.path().join("backing");
    let mut b = idx.clone();
    b.resize((uniaddr * 512) as usize, 0);
    b.extend_from_slice(&std::fs::read(&tar).unwrap());
    std::fs::write(&backing, &b).unwrap();
    let mnt = work.path().join("index-mnt");
    let _m = mount(&backing, &mnt);
    assert_same_tree(&expected, &mnt, checks);
}

#[test]
#[ignore = "needs root + kernel + erofs-utils"]
fn bad_sources_leave_nothing_behind() {
    if !ready() {
        return;
    }
    let work = work_dir("writer-bad");
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("x.erofs");
    let fails = |src: &Path, needle: &str| {
        let o = cmd::run(Command::new(common::EROFS_FANOTIFY).arg("build").arg(src).arg(&out), Duration::from_secs(60));
        assert!(!o.success(), "build of {} succeeded", src.display());
        let lines = o.stderr_lines();
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    };
    std::os::unix::fs::symlink("/nonexistent", work.path().join("dangling")).unwrap();
    fails(&work.path().join("dangling"), "dangling symlink");
    std::os::unix::fs::symlink("loop-b", work.path().join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", work.path().join("loop-b")).unwrap();
    fails(&work.path().join("loop-a"), "symlink loop");
    // A directory reachable twice through a bind mount.
    let looped = work.path().join("looped");
    std::fs::create_dir_all(looped.join("a/b")).unwrap();
    let target = CString::new(looped.join("a/b").as_os_str().as_bytes()).unwrap();
    let source = CString::new(looped.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings; a plain bind mount undone by the guard below.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());
    let guard = PlainMount(looped.join("a/b"));
    fails(&looped, "reachable twice");
    drop(guard);
    // Tars: `..`, a name over 255 bytes, a truncated gzip.
    let py = |name: &str, body: &str| {
        let p = work.path().join(name);
        let script = format!("import tarfile, io\nt = tarfile.open('{}', 'w', format=tarfile.GNU_FORMAT)\n{body}\nt.close()", p.display());
        run_ok(Command::new("python3").arg("-c").arg(script));
        p
    };
    let add = "def add(n, d=b'x'):\n    ti = tarfile.TarInfo(n); ti.size = len(d); t.addfile(ti, io.BytesIO(d))\n";
    fails(&py("dotdot.tar", &format!("{add}add('a/../../escape')")), "..");
    fails(&py("long.tar", &format!("{add}add('d/' + 'n' * 256)")), "longer than 255");
    let big = py("big.tar", &format!("{add}import os\nadd('f', os.urandom(300000))"));
    let gz = work.path().join("big.tar.gz");
    run_ok(Command::new("sh").arg("-c").arg(format!("gzip -c {} | head -c 100000 > {}", big.display(), gz.display())));
    fails(&gz, "truncated");
}
