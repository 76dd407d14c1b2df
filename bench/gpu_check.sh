#!/usr/bin/env bash
# The GPU check in one command on the project's GPU machine (docs/GPU.md, "Checking on the
# project's GPU machine"). From the repository root of a working tree that has .whl/<part>/:
#
#   bash bench/gpu_check.sh              # install the carried wheels, then bench/gpu_check.py
#   bash bench/gpu_check.sh --quick      # arguments go to bench/gpu_check.py
#   bash bench/gpu_check.sh --probe      # install, say what is importable, run nothing
#
# 1. Installs every wheel under .whl/ into $HCS_SITE (default /tmp/site) with pip --target,
#    once per wheel file (a list in $HCS_SITE/.hcs-installed), so that a second call that
#    carries another part installs only that part.
# 2. Puts this tree's hcs_dask on the path as the installed package is laid out: a copy
#    in $HCS_SOURCE (default /tmp/hcs-src) with graphs/ as hcs_dask/graphs (setuptools
#    maps it so; PYTHONPATH=. alone would lack hcs_dask.graphs, the bundled pipelines).
#    PYTHONSAFEPATH=1 keeps the current folder off sys.path, so that the tree's own
#    hcs_dask/ (without graphs) never shadows the copy, in workers and pytest too.
# 3. Checks that everything imports; if something is missing (the science part not
#    carried yet) it says which wheels to carry and exits 3 without running anything.
# 4. Runs bench/gpu_check.py under `timeout`, so that the report comes back within one
#    device call (its own --budget skips optional parts before that).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
site="${HCS_SITE:-/tmp/site}"
source_copy="${HCS_SOURCE:-/tmp/hcs-src}"
python="${PYTHON:-python3}"
probe=0
if [ "${1:-}" = "--probe" ]; then probe=1; shift; fi

mkdir -p "$site"
touch "$site/.hcs-installed"
shopt -s nullglob
new=()
for wheel in .whl/*.whl .whl/*/*.whl; do
    grep -qxF "$(basename "$wheel")" "$site/.hcs-installed" || new+=("$wheel")
done
if [ ${#new[@]} -gt 0 ]; then
    started=$SECONDS
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$site" "${new[@]}"
    for wheel in "${new[@]}"; do basename "$wheel"; done >> "$site/.hcs-installed"
    echo "installed ${#new[@]} wheels into $site in $((SECONDS - started)) s"
fi

rm -rf "$source_copy"
mkdir -p "$source_copy"
cp -r hcs_dask "$source_copy/hcs_dask"
rm -rf "$source_copy/hcs_dask/graphs"
cp -r graphs "$source_copy/hcs_dask/graphs"
find "$source_copy" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONSAFEPATH=1
export PYTHONPATH="$site:$source_copy${PYTHONPATH:+:$PYTHONPATH}"

"$python" - "$probe" <<'EOF'
import importlib, importlib.metadata as metadata, shutil, subprocess, sys

probe = sys.argv[1] == "1"
print(f"python {sys.version.split()[0]} at {sys.executable}")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
# module -> the wheel part that brings it ("machine": must be there already)
needed = {"numpy": "machine", "cupy": "machine", "scipy": "science", "pandas": "science", "skimage": "science",
          "dask": "base", "distributed": "base", "zarr": "base", "ome_zarr": "base", "pytest": "base",
          "dask_cuda": "base", "rmm": "base", "cuda.core": "base", "pynvml": "base", "hcs_dask.graphs": "source"}
missing = {}
for module, part in needed.items():
    try:
        loaded = importlib.import_module(module)
        where = getattr(loaded, "__file__", None) or "?"
        version = getattr(loaded, "__version__", "")
        print(f"  {module:<16} {str(version):<14} {where}")
    except Exception as error:
        print(f"  {module:<16} MISSING: {type(error).__name__}: {error}")
        missing.setdefault(part, []).append(module)
for part, modules in missing.items():
    if part in ("base", "science"):
        print(f"missing {', '.join(modules)}: carry .whl/{part} (bash bench/fetch_gpu_wheels.sh {part}) "
              "and run this again")
    else:  # numpy, CuPy: the machine's own; without CuPy the check says "no GPU: skipped"
        print(f"missing {', '.join(modules)}: not something a wheel of bench/gpu_wheels.txt brings")
if set(missing) & {"base", "science", "source"}:
    sys.exit(3)
print("everything the check needs imports" if not missing else "running the check all the same")
sys.exit(0)
EOF
[ "$probe" = 1 ] && exit 0
exec timeout "${HCS_CHECK_TIMEOUT:-580}" "$python" bench/gpu_check.py "$@"
