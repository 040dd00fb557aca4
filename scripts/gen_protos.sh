#!/usr/bin/env bash
# Regenerates the Python code and type stubs under bimip/ from protos/.
# The proto path equals the import path, so generated imports need no rewriting.
# With --check, generates into a temporary tree and fails if it differs from the committed code.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
case $py in /*) ;; *) py="$PWD/$py" ;; esac
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  cp -r protos scripts "$tmp/"
  PYTHON="$py" "$tmp/scripts/gen_protos.sh" >/dev/null 2>&1
  status=0
  for f in $(cd "$tmp" && find bimip -name '*_pb2*' | sort); do
    cmp -s "$tmp/$f" "$f" || { echo "stale: $f" >&2; status=1; }
  done
  for f in $(find bimip -name '*_pb2*' -not -path '*/__pycache__/*' | sort); do
    [ -e "$tmp/$f" ] || { echo "not generated from protos/: $f" >&2; status=1; }
  done
  [ $status = 0 ] && echo "generated protobuf code is fresh" || echo "run 'make proto' and commit the result" >&2
  exit $status
fi
bin=$(dirname "$py")
include=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
mapfile -t files < <(cd protos && find bimip -name '*.proto' | sort)
for f in "${files[@]}"; do
  d=bimip/$(dirname "${f#bimip/}")
  mkdir -p "$d"; rm -f "$d"/*_pb2.py "$d"/*_pb2.pyi "$d"/*_pb2_grpc.py "$d"/*_pb2_grpc.pyi
done
(cd protos && "$py" -m grpc_tools.protoc -I . -I "$include" \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out=.. --grpc_python_out=.. --mypy_out=.. --mypy_grpc_out=.. \
  "${files[@]}")
for f in "${files[@]}"; do
  d=bimip/$(dirname "${f#bimip/}")
  while [ "$d" != bimip ]; do touch "$d/__init__.py"; d=$(dirname "$d"); done
done
