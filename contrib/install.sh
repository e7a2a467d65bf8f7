#!/usr/bin/env bash
# Installs erofs-fanotify from a checkout: binaries, the mount(8) helper link, systemd units, OCI hook
# configuration (CRI-O / podman hooks.d), shell completions and man pages. Run as root from anywhere:
#   sudo contrib/install.sh            # builds with cargo (release) unless --no-build
#   sudo contrib/install.sh --prefix /usr --no-build
# Undo with contrib/uninstall.sh (same --prefix). Every installed path is listed in
# /var/lib/erofs-fanotify/installed-files so that uninstall removes exactly those.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
build=1
target_dir="${CARGO_TARGET_DIR:-target}"
while (($#)); do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --target-dir) target_dir="$2"; shift 2 ;;
        *) echo "usage: $0 [--prefix DIR] [--no-build] [--target-dir DIR]" >&2; exit 2 ;;
    esac
done
[[ $(id -u) == 0 ]] || { echo "install.sh: run as root" >&2; exit 1; }

if ((build)); then
    cargo build --release --bins
fi
bin_src="$target_dir/release"
bindir="$prefix/bin"
manifest_dir=/var/lib/erofs-fanotify
manifest="$manifest_dir/installed-files"
mkdir -p "$manifest_dir"
: >"$manifest.new"
record() { echo "$1" >>"$manifest.new"; }

for b in erofs-fanotify erofs-mount erofs-umount; do
    install -D -m 0755 "$bin_src/$b" "$bindir/$b"; record "$bindir/$b"
done

# mount(8) looks for /sbin/mount.<type> (and /sbin/fs.d, /sbin/fs): `mount -t erofs.fanotify` and fstab lines.
ln -sfn "$bindir/erofs-mount" /sbin/mount.erofs.fanotify; record /sbin/mount.erofs.fanotify

# systemd units, with the binaries' path substituted.
unitdir=/etc/systemd/system
for u in contrib/systemd/*.service contrib/systemd/*.timer; do
    sed "s#/usr/local/bin#$bindir#g" "$u" >"$unitdir/$(basename "$u")"; record "$unitdir/$(basename "$u")"
done
mkdir -p /etc/erofs-fanotify
command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true

# OCI hooks (hooks.d JSON, with the installed binary's path; the hook acts only on containers with an
# org.erofs-fanotify.* annotation). podman and buildah read containers.conf's hooks_dir, which defaults to
# /usr/share/containers/oci/hooks.d only (Debian's containers-common leaves it commented out; podman 4.3's
# built-in default is the same); CRI-O reads that one and /etc/containers/oci/hooks.d. A hooks_dir set in a
# containers.conf replaces the default, so the file goes there too.
configured_hook_dirs() {
    local f
    for f in /usr/share/containers/containers.conf /etc/containers/containers.conf /etc/containers/containers.conf.d/*.conf; do
        [[ -f $f ]] || continue
        # hooks_dir = ["a", "b"], possibly over several lines; a commented-out line is no setting.
        awk '/^[[:space:]]*hooks_dir[[:space:]]*=/ { on = 1 } on { print; if (/\]/) on = 0 }' "$f" | grep -o '"[^"]*"' | tr -d '"' || true
    done
}
hook_dirs=(/usr/share/containers/oci/hooks.d /etc/containers/oci/hooks.d)
while read -r d; do
    if [[ $d == /* ]]; then hook_dirs+=("$d"); fi
done < <(configured_hook_dirs)
mapfile -t hook_dirs < <(printf '%s\n' "${hook_dirs[@]}" | sort -u)
for d in "${hook_dirs[@]}"; do
    mkdir -p "$d"
    sed "s#/usr/local/bin#$bindir#g" contrib/hooks/erofs-fanotify.json >"$d/erofs-fanotify.json"; record "$d/erofs-fanotify.json"
done

# Shell completions and man pages, generated from the CLI definitions.
for c in erofs-fanotify erofs-mount erofs-umount; do
    f=/usr/share/bash-completion/completions/$c
    mkdir -p "$(dirname "$f")"; "$bindir/erofs-fanotify" completions bash --for "$c" >"$f"; record "$f"
    f=/usr/share/zsh/vendor-completions/_$c
    mkdir -p "$(dirname "$f")"; "$bindir/erofs-fanotify" completions zsh --for "$c" >"$f"; record "$f"
    f=/usr/share/fish/vendor_completions.d/$c.fish
    mkdir -p "$(dirname "$f")"; "$bindir/erofs-fanotify" completions fish --for "$c" >"$f"; record "$f"
done
mandir="$prefix/share/man/man8"
mkdir -p "$mandir"
"$bindir/erofs-fanotify" man --dir "$mandir" | while read -r page; do record "$page"; done
command -v mandb >/dev/null && mandb -q 2>/dev/null || true

cat "$manifest" "$manifest.new" 2>/dev/null | sort -u >"$manifest.tmp" || true
mv "$manifest.tmp" "$manifest"; rm -f "$manifest.new"
echo "installed into $prefix (files listed in $manifest)"
