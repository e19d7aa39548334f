#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls this script).
# Installs what is missing when it can (promtool via Debian's prometheus
# package, python3 for the shared result checker), then runs:
#   cargo fmt --check, cargo clippy -D warnings, cargo test (unit, library and
#   black-box tests of the real binary), and the dashboard/alert checks.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "$@" >/dev/null
    else
        echo "test.sh: please install: $*" >&2
        return 1
    fi
}

command -v python3 >/dev/null 2>&1 || apt_install python3
command -v promtool >/dev/null 2>&1 || apt_install prometheus
command -v mkfifo >/dev/null 2>&1 || apt_install coreutils
# curl runs the README's API examples as pasted (tests/operator_cli.rs);
# script(1) gives `run` a pseudo-terminal for its progress line.
command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
command -v script >/dev/null 2>&1 || apt_install bsdutils
# The tests signal processes with kill(1) (procps; `command -v` would find
# the shell builtin), and run a real nats-server (SPEC §13).
type -P kill >/dev/null 2>&1 || apt_install procps
command -v nats-server >/dev/null 2>&1 || apt_install nats-server
command -v openssl >/dev/null 2>&1 || apt_install openssl

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --all-targets -- --color never
echo "== observability artefacts (promtool)"
bash scripts/check-observability.sh
echo "== all checks passed"
