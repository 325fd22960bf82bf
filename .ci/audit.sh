#!/usr/bin/env bash
# Audit the locked runtime dependencies with pip-audit. Fails on a known vulnerability. When no
# vulnerability database can be reached (this build network reaches only package registries), it
# says so plainly instead of claiming a clean result.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .ci/.audit-venv >/dev/null && .ci/.audit-venv/bin/pip install -q pip-audit >/dev/null 2>&1 || {
    echo "audit: could not install pip-audit; dependencies NOT audited"; exit 0; }
out=$(.ci/.audit-venv/bin/pip-audit -r .ci/requirements.lock --no-deps --disable-pip --progress-spinner off 2>&1)
code=$?
echo "$out" | grep -v "^WARNING:pip_audit" | head -40
total=$(grep -cv '^\s*#\|^\s*$' .ci/requirements.lock)
skipped=$(echo "$out" | grep -c "could not be audited" || true)
if [[ $code -ne 0 ]] && echo "$out" | grep -q "Found [0-9]* known vulnerabilit"; then
    echo "audit: known vulnerabilities in locked dependencies"; exit 1
fi
if [[ "$skipped" -ge "$total" ]]; then
    echo "audit: the vulnerability service was unreachable for all $total packages; dependencies NOT audited"
else
    echo "audit: $((total - skipped)) of $total locked packages audited, no known vulnerabilities"
fi
exit 0
