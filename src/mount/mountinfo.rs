//! `/proc/PID/mountinfo` lines (proc(5)), parsed. Pure: unit-tested without root.
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)         (6)      (7)      (8)(9)   (10)      (11)
//! ```
//! Mountpoint, root and source have space, tab, newline and backslash escaped as `\ooo`.

/// One mount as a process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The reusable mount id (`STATX_MNT_ID`).
    pub mnt_id: u64,
    pub parent_id: u64,
    /// Relative to the reading process's root.
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
}

/// Parses one line; `None` for anything malformed.
pub fn parse_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let mut fields = left.split(' ');
    let mnt_id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let _dev = fields.next()?;
    let _root = fields.next()?;
    let mountpoint = unescape(fields.next()?);
    let mut right = right.split(' ');
    let fstype = right.next()?.to_string();
    let source = unescape(right.next()?);
    Some(MountInfo { mnt_id, parent_id, mountpoint, fstype, source })
}

/// Every well-formed line of a mountinfo text.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc5_example_and_escapes() {
        let m = parse_line("36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue").unwrap();
        assert_eq!((m.mnt_id, m.parent_id), (36, 35));
        assert_eq!(m.mountpoint, "/mnt/parent");
        assert_eq!((m.fstype.as_str(), m.source.as_str()), ("ext3", "/dev/root"));
        // No optional fields, escaped space and backslash.
        let m = parse_line(r"90 73 0:50 / /data/my\040img ro,nosuid,nodev - erofs /var/cache/a\134b ro").unwrap();
        assert_eq!(m.mountpoint, "/data/my img");
        assert_eq!(m.source, r"/var/cache/a\b");
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert_eq!(parse_line(""), None);
        assert_eq!(parse_line("x 1 0:1 / / rw - ext4 /dev/x rw"), None);
        assert_eq!(parse_line("1 2 0:1 / / rw ext4 /dev/x rw"), None);
        assert_eq!(parse_line("1 2 0:1 /"), None);
        // A trailing backslash or short escape stays literal; \777 does not fit a byte.
        assert_eq!(parse_line(r"1 2 0:1 / /a\1 rw - t s").unwrap().mountpoint, r"/a\1");
        assert_eq!(parse_line(r"1 2 0:1 / /a\777 rw - t s").unwrap().mountpoint, "/a?");
        assert_eq!(parse("1 2 0:1 / / rw - t s\ngarbage\n3 1 0:2 / /x rw - u v\n").len(), 2);
    }
}
