//! `FS_IOC_FIEMAP`: where a file's data lives. On EROFS (file backed) the
//! physical extents are offsets in the image, which lets a prefetch of listed
//! paths find their bytes without reading them. (Filesystem types come from
//! `nix::sys::statfs`; see `erofs_fanotify_state::check_cache_filesystem`.)

use std::io;

use super::cvt;

/// `FS_IOC_FIEMAP` = _IOWR('f', 11, struct fiemap) (32-byte header).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_HEADER: usize = 32;
const FIEMAP_EXTENT: usize = 56;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;

/// Physical byte ranges backing `file`, from `FS_IOC_FIEMAP`. On EROFS (file
/// backed) they are offsets in the image. Inline and unknown extents are
/// skipped: they live in metadata, which is local anyway.
pub fn fiemap(file: &std::fs::File) -> io::Result<Vec<std::ops::Range<u64>>> {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 256;
    let mut out = Vec::new();
    let mut start = 0u64;
    // Extents come in batches; cap the number of rounds for a hostile fs.
    for _ in 0..4096 {
        let mut buf = vec![0u64; (FIEMAP_HEADER + BATCH * FIEMAP_EXTENT) / 8];
        {
            let bytes: &mut [u8] = bytemuck_u64(&mut buf);
            bytes[0..8].copy_from_slice(&start.to_ne_bytes());
            bytes[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
            bytes[24..28].copy_from_slice(&(BATCH as u32).to_ne_bytes());
        }
        // SAFETY: `buf` is a zeroed, 8-byte aligned struct fiemap with room
        // for BATCH extents, as fm_extent_count says.
        cvt(unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) })?;
        let bytes: &[u8] = bytemuck_u64(&mut buf);
        let mapped = u32::from_ne_bytes(bytes[20..24].try_into().unwrap_or([0; 4])) as usize;
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for i in 0..mapped.min(BATCH) {
            let e = &bytes[FIEMAP_HEADER + i * FIEMAP_EXTENT..FIEMAP_HEADER + (i + 1) * FIEMAP_EXTENT];
            let word = |o: usize| u64::from_ne_bytes(e[o..o + 8].try_into().unwrap_or([0; 8]));
            let (logical, physical, length) = (word(0), word(8), word(16));
            let flags = u32::from_ne_bytes(e[40..44].try_into().unwrap_or([0; 4]));
            if flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED) == 0 && length > 0 {
                out.push(physical..physical.saturating_add(length));
            }
            start = logical.saturating_add(length);
            last |= flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last || mapped < BATCH {
            break;
        }
    }
    Ok(out)
}

fn bytemuck_u64(buf: &mut [u64]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length
    // covers exactly the same memory.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 8) }
}

#[cfg(test)]
mod fiemap_tests {
    use super::*;
    use std::process::Command;

    #[test]
    #[ignore = "needs root + EROFS file-backed mounts + mkfs.erofs"]
    fn fiemap_of_an_erofs_file_points_into_the_image() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(tree.join("f"), &data).unwrap();
        let image = dir.path().join("img");
        let st = Command::new("mkfs.erofs").arg(&image).arg(&tree).output().unwrap();
        assert!(st.status.success());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        crate::sys::mount::mount_erofs_file(&image, &mnt, None).unwrap();
        let result = fiemap(&std::fs::File::open(mnt.join("f")).unwrap());
        crate::sys::mount::umount(&mnt, false).unwrap();
        let extents = result.unwrap();
        assert!(!extents.is_empty());
        let img = std::fs::read(&image).unwrap();
        // The whole-block part of the file is where FIEMAP says.
        let first = &extents[0];
        let n = (first.end - first.start).min(data.len() as u64) as usize;
        assert_eq!(&img[first.start as usize..first.start as usize + n], &data[..n]);
    }
}
