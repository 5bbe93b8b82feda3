#!/usr/bin/env bash
# Runs one command in a non-booted systemd-nspawn container, without machined or a host
# systemd (--register=no --keep-unit), and cleans up after it.
#
#   tools/nspawn-run.sh ROOT NAME [NSPAWN OPTION...] -- COMMAND...
#
# nspawn --keep-unit makes payload/ and supervisor/ cgroups under the caller's own cgroup and
# leaves them: it runs from a cgroup of its own (NAME), removed afterwards, as is the
# propagation directory nspawn leaves when /run is not a tmpfs. Exits with the command's
# status. Recipe and traps: ../shared/docs/systemd-container.md.
set -uo pipefail

root=${1:?usage: nspawn-run.sh ROOT NAME [OPTION...] -- COMMAND...}
name=${2:?usage: nspawn-run.sh ROOT NAME [OPTION...] -- COMMAND...}
shift 2
options=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do options+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "nspawn-run.sh: no command" >&2; exit 2; }

rc=0
(
    for h in systemd unified; do
        [ -d "/sys/fs/cgroup/$h" ] || continue
        mkdir -p "/sys/fs/cgroup/$h/$name"
        echo "$BASHPID" > "/sys/fs/cgroup/$h/$name/cgroup.procs"
    done
    exec systemd-nspawn -q -D "$root" -M "$name" --register=no --keep-unit --pipe \
        --setenv=DEBIAN_FRONTEND=noninteractive "${options[@]}" -- "$@" </dev/null
) || rc=$?
for h in systemd unified; do
    [ -d "/sys/fs/cgroup/$h/$name" ] && find "/sys/fs/cgroup/$h/$name" -depth -type d \
        -exec rmdir {} \; 2>/dev/null
done
rm -rf "/run/systemd/nspawn/propagate/$name"
exit "$rc"
