#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on a lent GPU machine into .gpu/ (ignored by git): the wheels its
# image lacks (pydantic, gguf), WikiText-2, and the default model's GGUF (98 MB) in two halves, since one
# call of the device tool carries at most 64 MiB. Run here, in the repository root, after `make install`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/whl .gpu/b/wikitext-2
gguf=$(.venv/bin/python -c 'import os; from tqcompressor.modelio.models import resolve_alias; d, f = resolve_alias("smollm2-135m"); print(os.path.join(d, f))')
split -n 2 -d "$gguf" .gpu/part-
mv .gpu/part-00 .gpu/a/ && mv .gpu/part-01 .gpu/b/
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu/b/gguf.sha256
cp ../shared/data/wikitext-2/valid.txt ../shared/data/wikitext-2/test.txt .gpu/b/wikitext-2/
# the versions of the lock; the image's Python is 3.12 on x86-64
for wheel in $(grep -E '^(pydantic|pydantic_core|typing-inspection|annotated-types|gguf)==' constraints.txt); do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/b/whl "$wheel"
done
du -sh .gpu/a .gpu/b
