#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the pipeline as far as it
# exists (selective search -> SPP extraction) on a slice of VOC2007 test and summarise.
#   SPP_DEMO_IMAGES=N  images in the slice (default 8)
# With ../shared/data (the project's machines) it uses the VOC2007 slice and the
# SqueezeNet weights there; elsewhere it downloads VOC2007 and torchvision's weights.
set -euo pipefail
cd "$(dirname "$0")"
images=${SPP_DEMO_IMAGES:-8}
out=demo-out

python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e .
spp=.venv/bin/spp-detect

if [ -d ../shared/data/voc2007-mini ]; then
  voc=../shared/data/voc2007-mini
  weights=../shared/data/weights/squeezenet1_0-imagenet-deepcompression.pth
else
  $spp download-voc2007 --out data
  voc=data/VOCdevkit
  weights=imagenet
fi

$spp proposals --voc-root "$voc" --image-set test --limit "$images" --out "$out/proposals"
$spp extract --voc-root "$voc" --image-set test --limit "$images" --proposals "$out/proposals" \
    --backbone squeezenet1_0 --weights "$weights" --scales 480,576,688,864,1200 --out "$out/features"

echo
echo "== summary =="
$spp info "$out/proposals" --voc-root "$voc"
$spp info "$out/features"
