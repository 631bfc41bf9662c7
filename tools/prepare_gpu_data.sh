#!/usr/bin/env bash
# Copy what tools/gpu_run.sh trains on into .data/gpu (git-ignored; carried to the GPU machine):
# all paintings and the first N training photos (copies, not links: only the repository travels).
#   tools/prepare_gpu_data.sh PHOTOS_DIR PAINTINGS_DIR [N=2500]
set -euo pipefail
cd "$(dirname "$0")/.."
photos=$1 paintings=$2 n=${3:-2500}
rm -rf .data/gpu && mkdir -p .data/gpu/photo .data/gpu/monet
find -L "$photos" -maxdepth 1 -type f | sort > .data/gpu/photos.txt  # (head in a pipe would trip pipefail)
head -n "$n" .data/gpu/photos.txt | xargs -I{} cp -L {} .data/gpu/photo/
rm .data/gpu/photos.txt
find -L "$paintings" -maxdepth 1 -type f | xargs -I{} cp -L {} .data/gpu/monet/
du -sh .data/gpu
