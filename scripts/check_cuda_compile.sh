#!/usr/bin/env bash
# Compile-checks the CUDA sources without a GPU (CI): `nvcc -c` of every csrc/cuda/*.cu for
# sm_80 and sm_90, and a host-compiler syntax check of the torch binding csrc/cuda/*.cpp
# against the installed torch headers. Objects go to a temporary folder that is removed.
#
# Env: NVCC (default $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, or nvcc on PATH),
#      PYTHON (default python), CXX (default g++),
#      HYPERDAS_FAST_CUDA_ARCHS (default "80 90").
# Exit status: 0 when everything compiles, 1 on a compile error, 2 when nvcc is missing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${HYPERDAS_FAST_CUDA_SRC:-$ROOT/csrc/cuda}"  # override: tests point it at a broken file
PYTHON="${PYTHON:-python}"
CXX="${CXX:-g++}"
ARCHS="${HYPERDAS_FAST_CUDA_ARCHS:-80 90}"

if [[ -z "${NVCC:-}" ]]; then
  for cand in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc 2>/dev/null)"; do
    if [[ -n "$cand" && -x "$cand" ]]; then NVCC="$cand"; break; fi
  done
fi
if [[ -z "${NVCC:-}" || ! -x "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi
CUDA_ROOT="$(cd "$(dirname "$NVCC")/.." && pwd)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Same defines and flags as torch's CUDAExtension + setup.py.
NVCC_FLAGS=(-std=c++17 -O3 --use_fast_math -lineinfo --threads 0
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xcompiler -fPIC -I"$SRC")
for a in $ARCHS; do NVCC_FLAGS+=(-gencode "arch=compute_${a},code=sm_${a}"); done

# Torch include paths for sources that include torch headers. The CPU wheel lacks the
# generated c10/cuda/impl/cuda_cmake_macros.h; a stub with its one define stands in.
TORCH_INC=()
if "$PYTHON" -c "import torch" 2>/dev/null; then
  while IFS= read -r p; do TORCH_INC+=(-I"$p"); done < <("$PYTHON" -c "
import sysconfig, torch.utils.cpp_extension as c
for p in c.include_paths(): print(p)
print(sysconfig.get_paths()['include'])")
  mkdir -p "$TMP/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  TORCH_INC=(-I"$TMP/stub" "${TORCH_INC[@]}")
fi

status=0
pids=()
names=()
shopt -s nullglob
for f in "$SRC"/*.cu; do
  name="$(basename "$f")"
  extra=()
  if grep -qE '#include *[<"](torch|ATen|c10)/' "$f"; then
    if [[ ${#TORCH_INC[@]} -eq 0 ]]; then echo "check_cuda_compile: $name needs torch headers but torch is not importable" >&2; exit 1; fi
    extra=("${TORCH_INC[@]}")
  fi
  echo "nvcc -c $name (archs: $ARCHS)"
  "$NVCC" "${NVCC_FLAGS[@]}" ${extra[@]+"${extra[@]}"} -c "$f" -o "$TMP/${name%.cu}.o" >"$TMP/$name.log" 2>&1 &
  pids+=($!); names+=("$name")
done
for f in "$SRC"/*.cpp; do
  name="$(basename "$f")"
  if [[ ${#TORCH_INC[@]} -eq 0 ]]; then echo "check_cuda_compile: $name needs torch headers but torch is not importable" >&2; exit 1; fi
  echo "$CXX -fsyntax-only $name"
  "$CXX" -std=c++17 -fsyntax-only "${TORCH_INC[@]}" -I"$CUDA_ROOT/include" -I"$SRC" \
    "$f" >"$TMP/$name.log" 2>&1 &
  pids+=($!); names+=("$name")
done
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "FAILED: ${names[$i]}" >&2
    cat "$TMP/${names[$i]}.log" >&2
    status=1
  elif grep -E 'warning' "$TMP/${names[$i]}.log" | grep -q "csrc/cuda"; then
    echo "warnings in ${names[$i]}:" >&2
    grep -A3 -E 'csrc/cuda.*warning' "$TMP/${names[$i]}.log" >&2
  fi
done
if [[ ${#pids[@]} -eq 0 ]]; then echo "check_cuda_compile: no sources under $SRC" >&2; exit 1; fi
if [[ $status -eq 0 ]]; then echo "check_cuda_compile: OK (${#pids[@]} files)"; fi
exit $status
