#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt for the GPU check machine (Python 3.12,
# manylinux x86_64) into .whl/base/ and .whl/science/, and print the size of each part.
#
#   bash bench/fetch_gpu_wheels.sh                 # both parts into <repo>/.whl/
#   bash bench/fetch_gpu_wheels.sh base            # one part
#   WHEEL_DIR=/tmp/w PYTHON=/path/to/python bash bench/fetch_gpu_wheels.sh
#
# .whl/ is git-ignored: it travels to the device machine as a `carry` path, never in a commit.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
list="$repo/bench/gpu_wheels.txt"
root="${WHEEL_DIR:-$repo/.whl}"
python="${PYTHON:-python3}"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(base science)

requirements() {  # the requirement lines of one part
    awk -v part="$1" '/^# part: /{current=$3; next} /^[[:space:]]*(#|$)/{next} current==part{print $1}' "$list"
}

for part in "${parts[@]}"; do
    dest="$root/$part"
    mkdir -p "$dest"
    wanted=$(requirements "$part")
    [ -n "$wanted" ] || { echo "no part '$part' in $list" >&2; exit 2; }
    for requirement in $wanted; do
        "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$dest" "$requirement" 2> >(grep -v '^WARNING: Location' >&2 || true) \
            || { echo "no wheel for $requirement" >&2; exit 1; }
    done
    echo "$part: $(ls "$dest"/*.whl | wc -l) wheels for $(echo "$wanted" | wc -l) requirements," \
         "$(du -cb "$dest"/*.whl | tail -1 | cut -f1 | awk '{printf "%.1f MB (%.1f MiB)", $1/1e6, $1/1048576}') in $dest"
done
