//! The mount(8) helper calling convention.
//!
//! `mount -t erofs.fanotify SOURCE DIR` (and fstab lines of that type) make util-linux run
//! `/sbin/mount.erofs.fanotify SOURCE DIR [-s] [-f] [-n] [-v] [-o OPTS]` with no `-t` (it is implied by the
//! helper's name; libmount adds `-t TYPE` only when the helper name does not end with the type, so we accept
//! it too). `mount.erofs.fanotify` is a link to `erofs-mount`; `erofs-mount` looks at its argv[0] and, under
//! that name, reads its arguments this way instead of through clap. mount(8) has already dropped `noauto`,
//! `defaults` and `x-*` from OPTS; `ro`/`rw`, `_netdev`, `nofail` and `uhelper=` reach us and the option
//! parser ignores them (the image is read-only whatever is asked). Pure: unit-tested without root.

use std::ffi::OsString;
use std::path::PathBuf;

use super::mount_cmd::MountArgs;
use super::CliError;

/// The name under which `erofs-mount` behaves as a mount(8) helper.
pub const HELPER_NAME: &str = "mount.erofs.fanotify";

/// What mount(8) asked of the helper.
#[derive(Debug)]
pub struct HelperInvocation {
    pub args: MountArgs,
    /// `-f`: fake the mount (mount(8) does everything but the mount syscall).
    pub fake: bool,
    /// `-v`
    pub verbose: bool,
}

/// True when the program was started as `mount.erofs.fanotify` (through the helper link).
pub fn invoked_as_helper(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0).file_name().is_some_and(|n| n == HELPER_NAME)
}

/// Parses the helper arguments (without argv[0]).
pub fn parse_helper_args(args: &[OsString]) -> Result<HelperInvocation, CliError> {
    let mut positional: Vec<OsString> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let mut fstype = "erofs.fanotify".to_string();
    let (mut fake, mut verbose) = (false, false);
    let mut iter = args.iter();
    let value_of = |flag: char, inline: &str, iter: &mut std::slice::Iter<'_, OsString>| -> Result<String, CliError> {
        if !inline.is_empty() {
            return Ok(inline.to_string());
        }
        iter.next()
            .and_then(|v| v.to_str())
            .map(str::to_string)
            .ok_or_else(|| CliError::new(format!("option -{flag} needs a value")))
    };
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else {
            positional.push(arg.clone());
            continue;
        };
        if text.len() < 2 || !text.starts_with('-') {
            positional.push(arg.clone());
            continue;
        }
        // Short flags may be grouped (`-sfnv`); `-o`/`-t` take the rest of the word or the next one.
        let flags = &text[1..];
        for (i, flag) in flags.char_indices() {
            match flag {
                's' | 'n' => {}
                'f' => fake = true,
                'v' => verbose = true,
                'o' => {
                    options.push(value_of('o', &flags[i + 1..], &mut iter)?);
                    break;
                }
                't' => {
                    fstype = value_of('t', &flags[i + 1..], &mut iter)?;
                    break;
                }
                other => return Err(CliError::new(format!("{HELPER_NAME}: unknown option -{other}"))),
            }
        }
    }
    let [source, mountpoint]: [OsString; 2] = positional
        .try_into()
        .map_err(|_| CliError::new(format!("usage: {HELPER_NAME} SOURCE DIR [-sfnv] [-o OPTIONS]")))?;
    let source = source
        .into_string()
        .map_err(|_| CliError::new("the image source is not valid UTF-8"))?;
    Ok(HelperInvocation {
        args: MountArgs {
            fstype,
            options,
            foreground: false,
            source,
            mountpoint: PathBuf::from(mountpoint),
        },
        fake,
        verbose,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<HelperInvocation, CliError> {
        parse_helper_args(&args.iter().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn recognises_the_helper_name() {
        assert!(invoked_as_helper("/sbin/mount.erofs.fanotify".as_ref()));
        assert!(invoked_as_helper("mount.erofs.fanotify".as_ref()));
        assert!(!invoked_as_helper("/usr/bin/erofs-mount".as_ref()));
    }

    #[test]
    fn util_linux_convention() {
        let inv = parse(&["reg:5000/img:v1", "/mnt/x", "-n", "-o", "rw,oci.insecure,_netdev"]).unwrap();
        assert_eq!(inv.args.source, "reg:5000/img:v1");
        assert_eq!(inv.args.mountpoint, PathBuf::from("/mnt/x"));
        assert_eq!(inv.args.options, vec!["rw,oci.insecure,_netdev".to_string()]);
        assert_eq!(inv.args.fstype, "erofs.fanotify");
        assert!(!inv.fake && !inv.verbose);
    }

    #[test]
    fn grouped_flags_inline_values_and_type() {
        let inv = parse(&["-sfv", "src", "dir", "-oro", "-t", "erofs.fanotify"]).unwrap();
        assert!(inv.fake && inv.verbose);
        assert_eq!(inv.args.options, vec!["ro".to_string()]);
        let inv = parse(&["src", "dir", "-vo", "ro,cache_dir=/c"]).unwrap();
        assert!(inv.verbose);
        assert_eq!(inv.args.options, vec!["ro,cache_dir=/c".to_string()]);
    }

    #[test]
    fn rejects_bad_calls() {
        assert!(parse(&["src"]).is_err());
        assert!(parse(&["a", "b", "c"]).is_err());
        assert!(parse(&["a", "b", "-o"]).is_err());
        assert!(parse(&["a", "b", "-x"]).is_err());
    }
}
