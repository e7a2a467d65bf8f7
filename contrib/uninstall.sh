#!/usr/bin/env bash
# Removes what contrib/install.sh installed (the paths listed in /var/lib/erofs-fanotify/installed-files).
# Mounts are left alone: unmount them first (erofs-umount --all). The cache (/var/cache/erofs-fanotify) is
# kept unless --purge.
set -euo pipefail
purge=0
[[ "${1:-}" == --purge ]] && purge=1
[[ $(id -u) == 0 ]] || { echo "uninstall.sh: run as root" >&2; exit 1; }
manifest=/var/lib/erofs-fanotify/installed-files
[[ -f $manifest ]] || { echo "uninstall.sh: nothing recorded in $manifest" >&2; exit 1; }
for u in erofs-fanotify-metrics.timer; do
    command -v systemctl >/dev/null && systemctl disable --now "$u" 2>/dev/null || true
done
while read -r f; do
    [[ -n $f ]] && rm -f -- "$f"
done <"$manifest"
rm -f "$manifest"; rmdir /var/lib/erofs-fanotify /etc/erofs-fanotify 2>/dev/null || true
command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
((purge)) && rm -rf /var/cache/erofs-fanotify
echo "uninstalled"
