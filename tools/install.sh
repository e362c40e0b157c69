#!/usr/bin/env bash
# Install hf_gns in editable mode with its dev tools, without ever letting pip
# replace (or pull in) a torch build that does not fit the machine.
#
#   PYTHON=/path/to/python bash tools/install.sh      # default: python3
#
# 1. torch: an importable torch is kept as it is. Otherwise
#    - with a CUDA GPU (nvidia-smi lists one): the registry's torch (CUDA build);
#    - without: the local CPU wheel torch==$TORCH_CPU_VERSION found in pip's
#      find-links directories (/opt/wheels on the dev/CI machines), else the
#      PyTorch CPU index as a last resort. A plain `pip install torch` on a
#      CPU-only machine would download several GB of CUDA packages.
# 2. `pip install -e ".[dev]"` with torch constrained to the installed version, so
#    no dependency's range can upgrade or swap it.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"
EXTRAS="${EXTRAS:-dev}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP=("$PYTHON" -m pip)

say() { printf '[install] %s\n' "$*"; }

# pip's output without the lines that say nothing on a re-run ("Requirement already satisfied")
# and without pip's "WARNING: Location 'file:///...' is ignored: it is neither a file nor a
# directory": a local index of pip's own configuration (e.g. an extra-index-url) that does not hold
# some package, ~100 lines on a first install. They are counted in one line; every other line
# (real warnings and errors included) passes, and pip's exit status is kept (pipefail).
pip_output() {
    awk '/^Requirement already satisfied/ { next }
         /^WARNING: Location .* is ignored: it is neither a file nor a directory\.?$/ { hidden++; next }
         { print; fflush() }
         END { if (hidden) printf "[install] (%d pip warnings \"Location file://... is ignored\" hidden: an index directory of pip'"'"'s configuration lacks those packages)\n", hidden }'
}

torch_version() {
    "$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null
}

has_cuda_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

# pip's find-links directories: from the environment and from pip's config files.
find_links_dirs() {
    {
        printf '%s\n' ${PIP_FIND_LINKS:-}
        "${PIP[@]}" config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n'
    } | sed 's#^file://##' | awk 'NF && !seen[$0]++'
}

install_cpu_torch() {
    local dir whl
    while IFS= read -r dir; do
        [ -d "$dir" ] || continue
        for whl in "$dir"/torch-"$TORCH_CPU_VERSION"*.whl; do
            [ -e "$whl" ] || continue
            say "no CUDA GPU: installing the local CPU wheel $whl"
            # Installing the file itself (not a requirement) means pip cannot pick a
            # CUDA build of the same version from the registry. A wheel for another
            # Python/platform is refused by pip and we try the next one.
            if "${PIP[@]}" install "$whl" 2>&1 | pip_output; then
                return 0
            fi
        done
    done < <(find_links_dirs)
    say "no local CPU wheel torch-$TORCH_CPU_VERSION*.whl in pip's find-links directories;"
    say "last resort: the PyTorch CPU index (needs network access to download.pytorch.org)."
    "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu || {
        say "ERROR: could not install a CPU build of torch. Install one yourself (never a plain"
        say "'pip install torch' on a CPU-only machine: that pulls several GB of CUDA packages),"
        say "then re-run this script: an installed torch is kept."
        exit 1
    }
}

say "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

if version="$(torch_version)"; then
    say "torch $version already installed: keeping it"
elif has_cuda_gpu; then
    say "CUDA GPU found: installing torch (CUDA build) from the registry"
    "${PIP[@]}" install torch 2>&1 | pip_output
else
    install_cpu_torch
fi

version="$(torch_version)" || { say "ERROR: torch does not import after installing it"; exit 1; }

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# The distribution's own version ("2.13.0+cpu") so that the pin matches the local label.
"$PYTHON" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' >"$constraints"
say "installing hf_gns[$EXTRAS] (editable) with constraint: $(cat "$constraints")"
"${PIP[@]}" install -c "$constraints" -e "$ROOT[$EXTRAS]" 2>&1 | pip_output

say "done: torch $version, $("$PYTHON" -c 'import hf_gns, os; print("hf_gns from", os.path.dirname(hf_gns.__file__))' 2>/dev/null || echo 'hf_gns not importable yet (no hf_gns/ package?)')"
