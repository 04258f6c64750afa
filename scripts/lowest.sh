#!/usr/bin/env bash
# Install vmvault with every runtime dependency at its declared floor (each ">=X" in
# pyproject.toml becomes "==X") into a separate virtual environment, then run the tests
# that exercise those dependencies: crypto, chunk ids and keys (cryptography, zstandard,
# blake3), disk checksums (crc32c), the SFTP and S3 backends (paramiko, boto3), the install
# checks and the dashboard's API, logins and server (starlette, uvicorn, jinja2,
# python-multipart).
# The floors are thereby what CI proves, not a guess. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VMVAULT_LOWEST_VENV:-${TMPDIR:-/tmp}/vmvault-lowest-venv}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python3 - "$constraints" <<'PY'
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
specs = list(project["dependencies"]) + list(extras["hyperv"]) + list(extras["web"])
with open(sys.argv[1], "w") as out:
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)(?:,.*)?", spec)
        if match is None:
            sys.exit(f"scripts/lowest.sh: {spec!r} has no '>=' floor")
        print(f"{match[1]}=={match[2]}", file=out)
PY
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --constraint "$constraints" \
  ".[hyperv,web]" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "moto[s3]>=5.0" flask flask-cors \
  "httpx>=0.27"
"$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(cryptography|zstandard|crc32c|blake3|paramiko|boto3|botocore|pypsrp|starlette|uvicorn|jinja2|python-multipart) '
# the installed package, not the work tree: no PYTHONPATH (the fresh-install tests build
# their own environment at the newest versions, so they are left to the main run)
env -u PYTHONPATH VMVAULT_TEST_CHEAP_KDF=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/repo/test_crypto.py tests/repo/test_keys_locks_open.py tests/repo/test_format_frozen.py \
  tests/engine/test_chunk_ids.py tests/disk/test_vhdx_layout.py \
  tests/backends/test_sftp.py tests/backends/test_sftp_wire.py tests/backends/test_s3.py tests/cli/test_install.py \
  tests/web/test_api.py tests/web/test_auth.py tests/web/test_server.py tests/web/test_clients.py \
  -k "not fresh_install" "$@"
