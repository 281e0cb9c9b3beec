# Shared by scripts/demo and scripts/test (sourced, not run): system packages and the .venv.
# Expects to run from the repository root with `set -euo pipefail` in effect.

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

log() { printf '==> %s\n' "$*" >&2; }

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root for: $* (run as root or install sudo)"
        return 1
    fi
}

# apt_install PACKAGE... : install Debian packages (one apt-get update per script run).
APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found; install these packages by hand: $*"
        return 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# The interpreter must be 3.11+; Debian's python3 needs python3-venv for `-m venv` (ensurepip).
ensure_python() {
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        log "$PYTHON not found"
        apt_install python3 python3-venv
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        log "$("$PYTHON" -V 2>&1) is too old: sbc needs Python 3.11 or newer (set PYTHON=...)"
        return 1
    fi
    if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
}

# Create .venv once (reused afterwards) and install sbc editable with its test and fast extras.
# The install is redone only when pyproject.toml changed since the last one.
ensure_venv() {
    ensure_python
    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "$VENV is broken; recreating it"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV with $("$PYTHON" -V 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.sbc-installed"
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        log "installing sbc and its dependencies into $VENV"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --editable '.[test,fast]'
        printf '%s\n' "$want" >"$stamp"
    else
        log "reusing $VENV (pyproject.toml unchanged since the last install)"
    fi
    export PATH="$PWD/$VENV/bin:$PATH"
    export VIRTUAL_ENV="$PWD/$VENV"
}
