#!/bin/sh
# Run in a release's build root before the package build (tools/build-deb.sh): leaves out of
# DEBIAN_DIR/*.lintian-overrides the lines of tags this release's lintian does not know.
# Lintian retires and renames tags between releases, and an override of an unknown tag is an
# error there (alien-tag); bookworm's lintian still needs the ones trixie's has retired.
#
#   lintian-known-overrides.sh DEBIAN_DIR
set -eu
for file in "${1:?usage: lintian-known-overrides.sh DEBIAN_DIR}"/*.lintian-overrides; do
    [ -e "$file" ] || continue
    kept=$(mktemp)
    name=$(basename "$file")
    while IFS= read -r line; do
        case $line in
            [a-z0-9]*:\ *)
                tag=$(printf '%s\n' "$line" | cut -d' ' -f2)
                if ! lintian-explain-tags "$tag" >/dev/null 2>&1; then
                    echo "lintian-known-overrides: $name: $tag is not a tag here" >&2
                    continue
                fi ;;
        esac
        printf '%s\n' "$line" >> "$kept"
    done < "$file"
    mv "$kept" "$file"
done
