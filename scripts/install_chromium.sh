#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (Playwright drives it; it never downloads its own).
# Does nothing when a chromium is already on PATH or LATENT_LAB_CHROMIUM points at one.
set -euo pipefail
if [[ -n "${LATENT_LAB_CHROMIUM:-}" && -x "${LATENT_LAB_CHROMIUM}" ]] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" == 0 ]]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_chromium: chromium is missing and this user cannot apt-get install it." >&2
    echo "  Install Debian's 'chromium' package, or set LATENT_LAB_CHROMIUM=/path/to/chromium." >&2
    exit 1
fi
echo "install_chromium: apt-get install chromium (for the real-browser widget tests)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
chromium --version
