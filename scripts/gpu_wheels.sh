#!/usr/bin/env bash
# Wheels that benchmarks/gpu.py needs on the lent GPU machine, whose image has torch,
# transformers, numpy, httpx, rich, tqdm, pandas, einops, jaxtyping, ... but no pydantic and no
# TransformerLens (README.md, "Running the GPU check"). Downloads them into .whl/ (git-ignored
# through .git/info/exclude) for Python 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo /.whl/ >> "$EXCLUDE"
PLATFORMS=()
for n in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${n}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  httpx-sse==0.4.3 transformer-lens==4.3.0 fancy-einsum==0.0.3 beartype==0.23.1 \
  typeguard==4.6.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls .whl
