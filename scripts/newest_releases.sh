#!/usr/bin/env bash
# Runs the test suite against today's newest releases of every dependency (not in CI), so that a
# release that breaks us is found on purpose rather than by a new user.
#
#   scripts/newest_releases.sh            # fresh venv, newest releases, pytest; prints what moved
#   scripts/newest_releases.sh --write    # the same, and on a green run writes constraints.txt
#
# torch stays pinned as in the README (an unpinned torch pulls several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN="torch==2.13.0"
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "$TORCH_PIN" -e ".[test]"
"$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v "^pip==" | grep -v '^torch==' | sort -f > "$venv/../newest.txt"
echo "$TORCH_PIN" >> "$venv/../newest.txt"
echo "== versions that differ from constraints.txt (old -> newest):"
python3 - "$venv/../newest.txt" <<'PY'
import sys
def read(path):
    return {l.split("==")[0].lower(): l.split("==")[1] for l in open(path) if "==" in l and not l.startswith("#")}
old, new = read("constraints.txt"), read(sys.argv[1])
for name in sorted(old.keys() | new.keys()):
    if old.get(name) != new.get(name):
        print(f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}")
PY
status=0
"$venv/bin/python" -m pytest -q || status=$?
if [ "$status" -eq 0 ] && [ "${1:-}" = "--write" ]; then
  { sed -n '1,/^[^#]/{/^#/p}' constraints.txt; cat "$venv/../newest.txt"; } > constraints.txt.new
  mv constraints.txt.new constraints.txt
  echo "== constraints.txt now holds the newest releases (commit it with the test run's result)"
fi
rm -rf "$(dirname "$venv")"
exit "$status"
