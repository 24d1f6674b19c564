# shellcheck shell=bash
# Sourced by scripts/test (and anything else that needs the project's Python).
#
# Why this exists: CI runs `.ci/run` on a machine that may be brand new, so the
# project's own files must install everything it needs (system packages for
# building pyfuse3 and running FUSE mounts, then a virtualenv with the package
# in editable mode). On a machine that already has it all, this must be cheap:
# dpkg is asked before apt-get runs, and pip is skipped while the stamp in the
# venv matches the sha256 of pyproject.toml.
#
# After `jz_install_deps`:
#   JZ_PY   the venv's python
#   PATH    starts with the venv's bin (so `jiaozifuse`, `ruff`, `pytest` resolve there)

JZ_REPO="${JZ_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
JZ_VENV="${JIAOZIFUSE_VENV:-$JZ_REPO/.venv}"
JZ_DEB_PACKAGES=(fuse3 libfuse3-dev pkg-config sqlite3 rsync git build-essential python3-venv
    redis-server attr)
command -v npm >/dev/null 2>&1 || JZ_DEB_PACKAGES+=(nodejs npm)  # tests/filecoin cross-checks

jz_log() {
    echo "[jz] $*" >&2
}

# Install the Debian packages that are not installed yet (root only; otherwise
# just report what is missing and carry on: a developer machine may have them
# under other names, and pip will fail loudly if libfuse3 is truly absent).
jz_install_debs() {
    local missing=() pkg
    for pkg in "${JZ_DEB_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        jz_log "missing Debian packages (not root, not installing): ${missing[*]}"
        return 0
    fi
    jz_log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Create the venv if needed and (re)install the package when pyproject.toml changed.
jz_install_venv() {
    local stamp want have=""
    if [ ! -x "$JZ_VENV/bin/python" ]; then
        jz_log "creating virtualenv at $JZ_VENV with $(command -v python3)"
        python3 -m venv "$JZ_VENV"
    fi
    stamp="$JZ_VENV/.jiaozifuse-installed"
    want="$(sha256sum "$JZ_REPO/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$stamp" ]; then
        have="$(cat "$stamp")"
    fi
    if [ "$have" != "$want" ]; then
        jz_log "pip install -e '$JZ_REPO[test]' (pyproject.toml changed or first install)"
        "$JZ_VENV/bin/python" -m pip install -q --upgrade pip
        "$JZ_VENV/bin/python" -m pip install -q -e "$JZ_REPO[test]"
        echo "$want" >"$stamp"
    fi
}

jz_install_deps() {
    jz_install_debs
    jz_install_venv
    export JZ_PY="$JZ_VENV/bin/python"
    export PATH="$JZ_VENV/bin:$PATH"
}
