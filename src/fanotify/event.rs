//! Pure parsing of one `read()` batch from a fanotify group.
//!
//! No syscalls here: the input is the byte buffer `read()` filled, the
//! output is plain data, so every corner case is unit-tested without root.
//!
//! The buffer holds whole events back to back. Each event is a 24-byte
//! `fanotify_event_metadata` followed by info records (`{u8 type, u8 pad,
//! u16 len}` headers) up to `event_len`. The kernel installed one fd in our
//! table for every event that carries one, so even an event we cannot parse
//! must report its fd whenever the fd field can be located, or it would
//! leak (and, for a permission event, leave a reader blocked). A malformed
//! event's fd is reported only when the fixed header is complete and of the
//! known version: a guessed number could name an unrelated descriptor.
//! After an inconsistent `event_len` the rest of the batch cannot be walked,
//! so parsing stops there; the kernel never produces such batches.

use crate::sys::fanotify::{
    FANOTIFY_METADATA_VERSION, FAN_EVENT_INFO_HEADER_LEN, FAN_EVENT_INFO_RANGE_LEN,
    FAN_EVENT_INFO_TYPE_RANGE, FAN_EVENT_METADATA_LEN,
};

/// The byte range a pre-content event is about. Page-aligned, following the
/// reader's readahead, and *not* clipped to the file size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileRange {
    pub offset: u64,
    pub count: u64,
}

impl FileRange {
    /// One past the last byte (`offset + count`; the parser guarantees it
    /// does not overflow).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.count)
    }

    /// The part of the range inside a file of `size` bytes, or `None` if it
    /// lies entirely past the end.
    pub fn clamp_to(&self, size: u64) -> Option<FileRange> {
        if self.offset >= size {
            return None;
        }
        Some(FileRange {
            offset: self.offset,
            count: self.end().min(size) - self.offset,
        })
    }
}

/// One well-formed event as the kernel reported it. `fd` is an open
/// descriptor in our table (or `FAN_NOFD` = -1) that someone must close:
/// hand the event to `fanotify::response::classify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent {
    pub mask: u64,
    pub fd: i32,
    pub pid: i32,
    pub range: Option<FileRange>,
}

/// Why an event could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventParseError {
    #[error("{remaining} trailing bytes, less than an event header")]
    TruncatedMetadata { remaining: usize },
    #[error("event metadata version {found}, expected {FANOTIFY_METADATA_VERSION}")]
    WrongVersion { found: u8 },
    #[error("event_len {event_len} is smaller than the event header")]
    EventLenTooSmall { event_len: u32 },
    #[error("event_len {event_len} runs past the {remaining} bytes left in the batch")]
    EventLenPastBuffer { event_len: u32, remaining: usize },
    #[error("metadata_len {metadata_len} is inconsistent with event_len {event_len}")]
    MetadataLenInvalid { metadata_len: u16, event_len: u32 },
    #[error("info record header truncated ({remaining} bytes left in the event)")]
    InfoHeaderTruncated { remaining: usize },
    #[error("info record of type {info_type} has invalid length {len}")]
    InfoLenInvalid { info_type: u8, len: u16 },
    #[error("info record of type {info_type} (len {len}) runs past the event end ({remaining} bytes left)")]
    InfoPastEventEnd {
        info_type: u8,
        len: u16,
        remaining: usize,
    },
    #[error("range info record too short ({len} bytes)")]
    RangeRecordTooShort { len: u16 },
    #[error("event carries more than one range record")]
    DuplicateRange,
    #[error("range offset {offset} + count {count} overflows")]
    RangeOverflow { offset: u64, count: u64 },
}

/// An event that could not be parsed. `fd`, when known, is an open
/// descriptor that must still be answered (if a permission event) and closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub fd: Option<i32>,
    /// The mask, when the header could be read.
    pub mask: Option<u64>,
    pub error: EventParseError,
}

/// Everything found in one `read()` batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ParsedBatch {
    pub events: Vec<RawEvent>,
    pub malformed: Vec<Malformed>,
}

fn bytes_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}
fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    bytes_at(buf, at).map(u16::from_ne_bytes)
}
fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    bytes_at(buf, at).map(u32::from_ne_bytes)
}
fn i32_at(buf: &[u8], at: usize) -> Option<i32> {
    bytes_at(buf, at).map(i32::from_ne_bytes)
}
fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    bytes_at(buf, at).map(u64::from_ne_bytes)
}

/// The fixed header of one event (native endian, like the kernel writes it).
struct Header {
    event_len: u32,
    vers: u8,
    metadata_len: u16,
    mask: u64,
    fd: i32,
    pid: i32,
}

fn read_header(buf: &[u8]) -> Option<Header> {
    Some(Header {
        event_len: u32_at(buf, 0)?,
        vers: *buf.get(4)?,
        metadata_len: u16_at(buf, 6)?,
        mask: u64_at(buf, 8)?,
        fd: i32_at(buf, 16)?,
        pid: i32_at(buf, 20)?,
    })
}

/// Parses a batch. Never panics, whatever the bytes.
pub fn parse_batch(buf: &[u8]) -> ParsedBatch {
    let mut batch = ParsedBatch::default();
    let mut pos = 0usize;
    while pos < buf.len() {
        let rest = &buf[pos..];
        let Some(header) = read_header(rest) else {
            batch.malformed.push(Malformed {
                fd: None,
                mask: None,
                error: EventParseError::TruncatedMetadata {
                    remaining: rest.len(),
                },
            });
            break;
        };
        let event_len = header.event_len as usize;

        if header.vers != FANOTIFY_METADATA_VERSION {
            // The field layout is unknown, so the fd cannot be trusted; by
            // fanotify's ABI promise `event_len` stays first, so try to skip.
            batch.malformed.push(Malformed {
                fd: None,
                mask: None,
                error: EventParseError::WrongVersion { found: header.vers },
            });
            if event_len >= FAN_EVENT_METADATA_LEN && event_len <= rest.len() {
                pos += event_len;
                continue;
            }
            break;
        }

        let fd = (header.fd >= 0).then_some(header.fd);
        let malformed = |error| Malformed {
            fd,
            mask: Some(header.mask),
            error,
        };
        if event_len < FAN_EVENT_METADATA_LEN {
            batch
                .malformed
                .push(malformed(EventParseError::EventLenTooSmall {
                    event_len: header.event_len,
                }));
            break;
        }
        if event_len > rest.len() {
            batch
                .malformed
                .push(malformed(EventParseError::EventLenPastBuffer {
                    event_len: header.event_len,
                    remaining: rest.len(),
                }));
            break;
        }
        let event = &rest[..event_len];
        pos += event_len;

        let metadata_len = usize::from(header.metadata_len);
        if metadata_len < FAN_EVENT_METADATA_LEN || metadata_len > event_len {
            batch
                .malformed
                .push(malformed(EventParseError::MetadataLenInvalid {
                    metadata_len: header.metadata_len,
                    event_len: header.event_len,
                }));
            continue;
        }
        match parse_info_records(&event[metadata_len..]) {
            Ok(range) => batch.events.push(RawEvent {
                mask: header.mask,
                fd: header.fd,
                pid: header.pid,
                range,
            }),
            Err(error) => batch.malformed.push(malformed(error)),
        }
    }
    batch
}

/// Walks the info records of one event; returns its range record, if any.
/// Unknown record types are skipped.
fn parse_info_records(mut info: &[u8]) -> Result<Option<FileRange>, EventParseError> {
    let mut range = None;
    while !info.is_empty() {
        let (Some(&info_type), Some(len)) = (info.first(), u16_at(info, 2)) else {
            return Err(EventParseError::InfoHeaderTruncated {
                remaining: info.len(),
            });
        };
        let record_len = usize::from(len);
        if record_len < FAN_EVENT_INFO_HEADER_LEN {
            // A zero length would never advance.
            return Err(EventParseError::InfoLenInvalid { info_type, len });
        }
        if record_len > info.len() {
            return Err(EventParseError::InfoPastEventEnd {
                info_type,
                len,
                remaining: info.len(),
            });
        }
        let record = &info[..record_len];
        if info_type == FAN_EVENT_INFO_TYPE_RANGE {
            // { hdr (4), pad (4), u64 offset, u64 count }
            let (Some(offset), Some(count)) = (u64_at(record, 8), u64_at(record, 16)) else {
                return Err(EventParseError::RangeRecordTooShort { len });
            };
            debug_assert!(record_len >= FAN_EVENT_INFO_RANGE_LEN);
            if range.is_some() {
                // Two ranges: which one is the truth? Refuse rather than guess.
                return Err(EventParseError::DuplicateRange);
            }
            if offset.checked_add(count).is_none() {
                return Err(EventParseError::RangeOverflow { offset, count });
            }
            range = Some(FileRange { offset, count });
        }
        info = &info[record_len..];
    }
    Ok(range)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sys::fanotify::{
        FAN_CLOSE_NOWRITE, FAN_NOFD, FAN_OPEN, FAN_PRE_ACCESS, FAN_Q_OVERFLOW,
    };

    /// Builds one event the way the kernel lays it out.
    pub(crate) fn event_bytes(mask: u64, fd: i32, pid: i32, infos: &[Vec<u8>]) -> Vec<u8> {
        let info_len: usize = infos.iter().map(Vec::len).sum();
        let event_len = (FAN_EVENT_METADATA_LEN + info_len) as u32;
        header_bytes(
            event_len,
            FANOTIFY_METADATA_VERSION,
            FAN_EVENT_METADATA_LEN as u16,
            mask,
            fd,
            pid,
        )
        .into_iter()
        .chain(infos.iter().flatten().copied())
        .collect()
    }

    pub(crate) fn header_bytes(
        event_len: u32,
        vers: u8,
        metadata_len: u16,
        mask: u64,
        fd: i32,
        pid: i32,
    ) -> Vec<u8> {
        let mut b = Vec::with_capacity(FAN_EVENT_METADATA_LEN);
        b.extend_from_slice(&event_len.to_ne_bytes());
        b.push(vers);
        b.push(0);
        b.extend_from_slice(&metadata_len.to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b
    }

    pub(crate) fn range_record(offset: u64, count: u64) -> Vec<u8> {
        let mut b = info_header(FAN_EVENT_INFO_TYPE_RANGE, FAN_EVENT_INFO_RANGE_LEN as u16);
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&offset.to_ne_bytes());
        b.extend_from_slice(&count.to_ne_bytes());
        b
    }

    fn info_header(info_type: u8, len: u16) -> Vec<u8> {
        let mut b = vec![info_type, 0];
        b.extend_from_slice(&len.to_ne_bytes());
        b
    }

    /// An info record of some other type with `payload` bytes after the header.
    fn other_record(info_type: u8, payload: usize) -> Vec<u8> {
        let mut b = info_header(info_type, (FAN_EVENT_INFO_HEADER_LEN + payload) as u16);
        b.extend(std::iter::repeat_n(0xAB, payload));
        b
    }

    fn fds_to_close(batch: &ParsedBatch) -> Vec<i32> {
        let mut fds: Vec<i32> = batch
            .events
            .iter()
            .map(|e| e.fd)
            .filter(|&fd| fd >= 0)
            .collect();
        fds.extend(batch.malformed.iter().filter_map(|m| m.fd));
        fds.sort();
        fds
    }

    #[test]
    fn empty_buffer() {
        assert_eq!(parse_batch(&[]), ParsedBatch::default());
    }

    #[test]
    fn single_event_without_info() {
        let buf = event_bytes(FAN_OPEN, 7, 1234, &[]);
        let batch = parse_batch(&buf);
        assert!(batch.malformed.is_empty());
        assert_eq!(
            batch.events,
            vec![RawEvent {
                mask: FAN_OPEN,
                fd: 7,
                pid: 1234,
                range: None
            }]
        );
    }

    #[test]
    fn pre_access_with_range() {
        let buf = event_bytes(FAN_PRE_ACCESS, 9, 42, &[range_record(4096, 16384)]);
        assert_eq!(buf.len(), 48);
        let batch = parse_batch(&buf);
        assert!(batch.malformed.is_empty());
        assert_eq!(
            batch.events[0].range,
            Some(FileRange {
                offset: 4096,
                count: 16384
            })
        );
    }

    #[test]
    fn several_events() {
        let mut buf = event_bytes(FAN_OPEN, 5, 1, &[]);
        buf.extend(event_bytes(FAN_PRE_ACCESS, 6, 2, &[range_record(0, 4096)]));
        buf.extend(event_bytes(FAN_CLOSE_NOWRITE, 7, 3, &[]));
        let batch = parse_batch(&buf);
        assert!(batch.malformed.is_empty());
        let fds: Vec<i32> = batch.events.iter().map(|e| e.fd).collect();
        assert_eq!(fds, vec![5, 6, 7]);
        assert_eq!(
            batch.events[1].range,
            Some(FileRange {
                offset: 0,
                count: 4096
            })
        );
        assert_eq!(batch.events[2].mask, FAN_CLOSE_NOWRITE);
    }

    #[test]
    fn multiple_info_records_unknown_skipped() {
        let records = [
            other_record(1, 12),
            range_record(8192, 262144),
            other_record(99, 0),
            other_record(4, 4),
        ];
        let buf = event_bytes(FAN_PRE_ACCESS, 11, 3, &records);
        let batch = parse_batch(&buf);
        assert!(batch.malformed.is_empty(), "{:?}", batch.malformed);
        assert_eq!(
            batch.events[0].range,
            Some(FileRange {
                offset: 8192,
                count: 262144
            })
        );
    }

    #[test]
    fn unknown_info_only() {
        let buf = event_bytes(FAN_OPEN, 3, 3, &[other_record(200, 20)]);
        let batch = parse_batch(&buf);
        assert!(batch.malformed.is_empty());
        assert_eq!(batch.events[0].range, None);
    }

    #[test]
    fn truncated_metadata() {
        let mut buf = event_bytes(FAN_OPEN, 5, 1, &[]);
        buf.extend_from_slice(&event_bytes(FAN_OPEN, 6, 1, &[])[..20]);
        let batch = parse_batch(&buf);
        assert_eq!(batch.events.len(), 1);
        assert_eq!(
            batch.malformed,
            vec![Malformed {
                fd: None,
                mask: None,
                error: EventParseError::TruncatedMetadata { remaining: 20 }
            }]
        );
        // Fewer bytes than a header alone.
        let batch = parse_batch(&[1, 2, 3]);
        assert!(batch.events.is_empty());
        assert_eq!(batch.malformed.len(), 1);
    }

    #[test]
    fn event_len_smaller_than_metadata() {
        let mut buf = header_bytes(16, FANOTIFY_METADATA_VERSION, 24, FAN_PRE_ACCESS, 8, 1);
        buf.extend(event_bytes(FAN_OPEN, 9, 1, &[]));
        let batch = parse_batch(&buf);
        assert!(batch.events.is_empty(), "cannot walk past a bad event_len");
        assert_eq!(batch.malformed.len(), 1);
        assert_eq!(batch.malformed[0].fd, Some(8));
        assert_eq!(batch.malformed[0].mask, Some(FAN_PRE_ACCESS));
        assert_eq!(
            batch.malformed[0].error,
            EventParseError::EventLenTooSmall { event_len: 16 }
        );
        // event_len 0 must not loop forever.
        let batch = parse_batch(&header_bytes(
            0,
            FANOTIFY_METADATA_VERSION,
            24,
            FAN_OPEN,
            4,
            1,
        ));
        assert_eq!(fds_to_close(&batch), vec![4]);
    }

    #[test]
    fn event_len_past_buffer() {
        let mut buf = event_bytes(FAN_OPEN, 5, 1, &[]);
        let mut second = event_bytes(FAN_PRE_ACCESS, 6, 1, &[range_record(0, 4096)]);
        second.truncate(40);
        buf.extend(second);
        let batch = parse_batch(&buf);
        assert_eq!(batch.events.len(), 1);
        assert_eq!(
            batch.malformed[0].error,
            EventParseError::EventLenPastBuffer {
                event_len: 48,
                remaining: 40
            }
        );
        assert_eq!(fds_to_close(&batch), vec![5, 6]);
    }

    #[test]
    fn metadata_len_inconsistent_is_skipped_by_event_len() {
        let mut buf = header_bytes(24, FANOTIFY_METADATA_VERSION, 8, FAN_OPEN, 5, 1);
        buf.extend(header_bytes(
            24,
            FANOTIFY_METADATA_VERSION,
            40,
            FAN_OPEN,
            6,
            1,
        ));
        buf.extend(event_bytes(FAN_OPEN, 7, 1, &[]));
        let batch = parse_batch(&buf);
        assert_eq!(batch.events.len(), 1);
        assert_eq!(batch.events[0].fd, 7);
        assert_eq!(batch.malformed.len(), 2);
        assert!(matches!(
            batch.malformed[0].error,
            EventParseError::MetadataLenInvalid {
                metadata_len: 8,
                ..
            }
        ));
        assert_eq!(fds_to_close(&batch), vec![5, 6, 7]);
    }

    #[test]
    fn info_record_len_zero() {
        let mut bad = info_header(FAN_EVENT_INFO_TYPE_RANGE, 0);
        bad.extend_from_slice(&[0; 20]);
        let mut buf = event_bytes(FAN_PRE_ACCESS, 12, 1, &[bad]);
        buf.extend(event_bytes(FAN_OPEN, 13, 1, &[]));
        let batch = parse_batch(&buf);
        assert_eq!(batch.events.len(), 1, "the next event is still parsed");
        assert_eq!(
            batch.malformed[0].error,
            EventParseError::InfoLenInvalid {
                info_type: 6,
                len: 0
            }
        );
        assert_eq!(fds_to_close(&batch), vec![12, 13]);
    }

    #[test]
    fn info_record_past_event_end() {
        let mut bad = range_record(0, 4096);
        bad[2..4].copy_from_slice(&64u16.to_ne_bytes());
        let batch = parse_batch(&event_bytes(FAN_PRE_ACCESS, 12, 1, &[bad]));
        assert!(batch.events.is_empty());
        assert_eq!(
            batch.malformed[0].error,
            EventParseError::InfoPastEventEnd {
                info_type: 6,
                len: 64,
                remaining: 24
            }
        );
        assert_eq!(batch.malformed[0].fd, Some(12));
    }

    #[test]
    fn info_header_truncated() {
        let batch = parse_batch(&event_bytes(FAN_OPEN, 3, 1, &[vec![1, 0]]));
        assert_eq!(
            batch.malformed[0].error,
            EventParseError::InfoHeaderTruncated { remaining: 2 }
        );
        assert_eq!(batch.malformed[0].fd, Some(3));
    }

    #[test]
    fn range_record_too_short() {
        let mut short = info_header(FAN_EVENT_INFO_TYPE_RANGE, 16);
        short.extend_from_slice(&[0; 12]);
        let batch = parse_batch(&event_bytes(FAN_PRE_ACCESS, 4, 1, &[short]));
        assert_eq!(
            batch.malformed[0].error,
            EventParseError::RangeRecordTooShort { len: 16 }
        );
    }

    #[test]
    fn duplicate_and_overflowing_ranges() {
        let batch = parse_batch(&event_bytes(
            FAN_PRE_ACCESS,
            4,
            1,
            &[range_record(0, 4096), range_record(4096, 4096)],
        ));
        assert_eq!(batch.malformed[0].error, EventParseError::DuplicateRange);
        let batch = parse_batch(&event_bytes(
            FAN_PRE_ACCESS,
            4,
            1,
            &[range_record(u64::MAX - 10, 4096)],
        ));
        assert!(matches!(
            batch.malformed[0].error,
            EventParseError::RangeOverflow { .. }
        ));
        assert_eq!(fds_to_close(&batch), vec![4]);
    }

    #[test]
    fn wrong_version_reports_no_fd_and_skips() {
        let mut buf = header_bytes(24, 2, 24, FAN_OPEN, 5, 1);
        buf.extend(event_bytes(FAN_OPEN, 6, 1, &[]));
        let batch = parse_batch(&buf);
        assert_eq!(
            batch.malformed,
            vec![Malformed {
                fd: None,
                mask: None,
                error: EventParseError::WrongVersion { found: 2 }
            }]
        );
        assert_eq!(batch.events.len(), 1);
        assert_eq!(batch.events[0].fd, 6);
        // With an unusable event_len the batch ends there.
        let batch = parse_batch(&header_bytes(9999, 4, 24, FAN_OPEN, 5, 1));
        assert_eq!(batch.malformed.len(), 1);
    }

    #[test]
    fn nofd_and_overflow() {
        let mut buf = event_bytes(FAN_Q_OVERFLOW, FAN_NOFD, 0, &[]);
        buf.extend(event_bytes(FAN_CLOSE_NOWRITE, FAN_NOFD, 5, &[]));
        let batch = parse_batch(&buf);
        assert!(batch.malformed.is_empty());
        assert_eq!(batch.events[0].mask, FAN_Q_OVERFLOW);
        assert_eq!(batch.events[0].fd, FAN_NOFD);
        assert!(fds_to_close(&batch).is_empty());
        // A malformed event without fd reports none.
        let batch = parse_batch(&event_bytes(FAN_OPEN, FAN_NOFD, 1, &[vec![1]]));
        assert_eq!(batch.malformed[0].fd, None);
    }

    #[test]
    fn clamp() {
        let r = FileRange {
            offset: 8192,
            count: 16384,
        };
        assert_eq!(r.end(), 24576);
        assert_eq!(
            r.clamp_to(10000),
            Some(FileRange {
                offset: 8192,
                count: 1808
            })
        );
        assert_eq!(r.clamp_to(1 << 20), Some(r));
        assert_eq!(r.clamp_to(8192), None);
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..20_000 {
            // Half pure noise, half valid batches with a few bytes flipped,
            // so the parser gets deep into the info records too.
            let mut buf: Vec<u8> = if round % 2 == 0 {
                (0..rng.below(200)).map(|_| rng.next() as u8).collect()
            } else {
                let mut b = Vec::new();
                for _ in 0..=rng.below(4) {
                    let infos = match rng.below(3) {
                        0 => vec![],
                        1 => vec![range_record(rng.next(), rng.next())],
                        _ => vec![
                            other_record(rng.below(8) as u8, rng.below(9) as usize),
                            range_record(0, 4096),
                        ],
                    };
                    b.extend(event_bytes(rng.next(), rng.below(64) as i32 - 1, 1, &infos));
                }
                for _ in 0..=rng.below(4) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] = rng.next() as u8;
                }
                b
            };
            if rng.below(4) == 0 {
                let cut = rng.below(buf.len() as u64 + 1) as usize;
                buf.truncate(cut);
            }
            let batch = parse_batch(&buf);
            // Every consumed event occupies at least a header.
            assert!(batch.events.len() * FAN_EVENT_METADATA_LEN <= buf.len());
            for m in &batch.malformed {
                assert!(m.fd.is_none_or(|fd| fd >= 0));
            }
        }
    }
}
