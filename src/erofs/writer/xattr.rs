//! Extended attribute names as EROFS stores them: a name index for the
//! prefix (`user.`, `trusted.`, `security.`, the two POSIX ACL names) and
//! the rest of the name.

use super::WriteError;

pub const INDEX_USER: u8 = 1;
pub const INDEX_POSIX_ACL_ACCESS: u8 = 2;
pub const INDEX_POSIX_ACL_DEFAULT: u8 = 3;
pub const INDEX_TRUSTED: u8 = 4;
pub const INDEX_SECURITY: u8 = 6;

/// Largest value an entry holds (`e_value_size` is 16 bits).
pub const VALUE_MAX: usize = u16::MAX as usize;

/// An xattr in its on-disk form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EncodedXattr {
    pub index: u8,
    pub suffix: Vec<u8>,
    pub value: Vec<u8>,
}

impl EncodedXattr {
    pub fn entry_size(&self) -> usize {
        super::ondisk::xattr_entry_size(self.suffix.len(), self.value.len())
    }
}

/// Whether EROFS can store an xattr of this name (the walker and the tar
/// reader skip, with a warning, names it cannot).
pub fn is_representable(name: &[u8]) -> bool {
    split_name(name).is_ok()
}

/// `user.foo` → (1, `foo`), `system.posix_acl_access` → (2, ``), ...
pub fn split_name(name: &[u8]) -> Result<(u8, &[u8]), WriteError> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    let (index, suffix) = if name == b"system.posix_acl_access" {
        (INDEX_POSIX_ACL_ACCESS, &b""[..])
    } else if name == b"system.posix_acl_default" {
        (INDEX_POSIX_ACL_DEFAULT, &b""[..])
    } else if let Some(s) = name.strip_prefix(b"user.") {
        (INDEX_USER, s)
    } else if let Some(s) = name.strip_prefix(b"trusted.") {
        (INDEX_TRUSTED, s)
    } else if let Some(s) = name.strip_prefix(b"security.") {
        (INDEX_SECURITY, s)
    } else {
        return Err(WriteError::Invalid(format!(
            "xattr {:?}: EROFS stores only user., trusted., security. and POSIX ACL xattrs",
            shown()
        )));
    };
    if index != INDEX_POSIX_ACL_ACCESS && index != INDEX_POSIX_ACL_DEFAULT && suffix.is_empty() {
        return Err(WriteError::Invalid(format!("xattr {:?} has an empty name", shown())));
    }
    if suffix.len() > u8::MAX as usize || suffix.contains(&0) {
        return Err(WriteError::Invalid(format!("xattr name {:?} is too long or has a NUL", shown())));
    }
    Ok((index, suffix))
}

pub fn encode(name: &[u8], value: &[u8]) -> Result<EncodedXattr, WriteError> {
    let (index, suffix) = split_name(name)?;
    if value.len() > VALUE_MAX {
        return Err(WriteError::Invalid(format!(
            "xattr {:?}: a value of {} bytes is larger than EROFS stores ({VALUE_MAX})",
            String::from_utf8_lossy(name),
            value.len()
        )));
    }
    Ok(EncodedXattr {
        index,
        suffix: suffix.to_vec(),
        value: value.to_vec(),
    })
}
