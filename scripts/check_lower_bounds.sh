#!/usr/bin/env bash
# The lower-bound job: installs every dependency at the lowest version pyproject.toml
# allows (each `name>=X` becomes `name==X`, the test extra's too), then runs the fast tier.
# A pass proves the lower bounds; a failure names the bound to raise.
#
#   bash scripts/check_lower_bounds.sh            # venv in .venv-lower
#   TORCH='torch==2.13.0' bash scripts/check_lower_bounds.sh
#
# torch is the exception: where PyPI's torch is a CUDA build (x86_64), its lower bound
# costs several GB, so TORCH names the torch requirement to install; it defaults to the
# pyproject lower bound. On our machines only torch 2.13.0 installs without CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv-lower}"
python3 - > "$venv.requirements.txt" <<'PYTHON'
import re
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)", requirement.split(";")[0])
    if match is None:
        raise SystemExit(f"pyproject.toml: {requirement!r} has no plain lower bound (name>=X)")
    name, version = match.groups()
    print(f"{name}=={version}")
PYTHON
lower_torch=$(grep -i '^torch==' "$venv.requirements.txt")
grep -iv '^torch==' "$venv.requirements.txt" > "$venv.others.txt"
echo "lower bounds: $(tr '\n' ' ' < "$venv.requirements.txt")"
echo "torch: ${TORCH:-$lower_torch}"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "${TORCH:-$lower_torch}" -r "$venv.others.txt"
"$venv/bin/pip" install -q --no-deps .
"$venv/bin/pip" check
"$venv/bin/pytest"
