#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the whole detector on a slice of
# VOC2007 (train on trainval, test on test) and print the per-class AP table and the mAP:
#   proposals -> extract -> finetune -> train-svm (+ box regression) -> detect -> evaluate
# Environment:
#   SPP_DEMO_FULL=1       the whole voc2007-mini set (200 trainval + 200 test images)
#   SPP_DEMO_TRAIN=N      trainval images (default 40), SPP_DEMO_TEST=N test images (default 20)
#   SPP_DEMO_SCALES=...   extract scales (default 688, the paper's 1-scale setting)
# With ../shared/data (the project's machines) it uses the VOC2007 slice and the SqueezeNet
# weights there; elsewhere it downloads VOC2007 and torchvision's ImageNet weights.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${SPP_DEMO_FULL:-0}" = 1 ]; then train=200; test=200; else train=${SPP_DEMO_TRAIN:-40}; test=${SPP_DEMO_TEST:-20}; fi
scales=${SPP_DEMO_SCALES:-688}
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
# The release's SVM cost C = 0.001 balances hinge loss and regulariser for VOC07's 5,011
# trainval images; the loss term shrinks with the training set, so C is scaled to match.
svm_c=$(python3 -c "print(min(1.0, 0.001 * 5011 / $train))")

for split in trainval test; do
  n=$([ $split = trainval ] && echo $train || echo $test)
  $spp proposals --voc-root "$voc" --image-set $split --limit "$n" --out "$out/proposals-$split"
  $spp extract --voc-root "$voc" --image-set $split --limit "$n" --proposals "$out/proposals-$split" \
      --backbone squeezenet1_0 --weights "$weights" --scales "$scales" --out "$out/features-$split"
done
$spp finetune --cache "$out/features-trainval" --out "$out/head" --fc-dim 1024 --iterations 300 --lr-steps 225 --lr 0.02
$spp train-svm --cache "$out/features-trainval" --head "$out/head" --features fc7 --bbox --C "$svm_c" --out "$out/svm"
$spp detect --cache "$out/features-test" --svm "$out/svm" --bbox --out "$out/detections"

echo
echo "== VOC2007 test mAP ($train trainval -> $test test images, scales $scales, SqueezeNet) =="
$spp evaluate --voc-root "$voc" --image-set test --limit "$test" --detections "$out/detections" --plots "$out"
first=$(head -n 1 "$voc/VOC2007/ImageSets/Main/test.txt")
$spp show --detections "$out/detections" --voc-root "$voc" --image "$first" --threshold -1 --top 5 --out "$out/detections-$first.png"
