#!/usr/bin/env bash
# Creates .venv with ReMP and its test tools. torch is pinned to the CPU build first so that the range in
# pyproject.toml does not pull a multi-GB CUDA build; on a GPU machine use the torch already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
