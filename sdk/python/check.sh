#!/usr/bin/env bash
# CI check of the stock Python runtime (sdk/python): Python 3.7 compatibility of
# asya_runtime.py (static, vermin) and the pytest suite (real runtime processes over a
# Unix socket). Works from any directory; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

py=${PYTHON:-python3}
export PYTHONDONTWRITEBYTECODE=1

if ! "$py" -c 'import pytest, vermin' >/dev/null 2>&1; then
  echo "check.sh: installing pytest and vermin"
  "$py" -m pip install -q pytest vermin
fi

echo "== vermin: asya_runtime.py must run on Python 3.7+"
# vermin's console script may not be on PATH (pip --user, pyenv): call its entry point.
"$py" -c 'import sys; from vermin.main import main; sys.exit(main())' \
  -t=3.7- --no-tips --violations --eval-annotations sdk/python/asya_runtime.py

echo "== pytest: sdk/python/tests"
timeout 300 "$py" -m pytest -q -p no:cacheprovider sdk/python/tests
