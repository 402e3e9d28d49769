#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run the whole detector on a slice of
# VOC2007 (train on trainval, test on test) and print the per-class AP table and the mAP:
#   proposals -> extract -> [finetune] -> train-svm (+ box regression) -> detect -> evaluate -> show
# Environment:
#   SPP_DEMO_FULL=1       the whole voc2007-mini set (200 trainval + 200 test images)
#   SPP_DEMO_TRAIN=N      trainval images (default 200: all of voc2007-mini's), SPP_DEMO_TEST=N test images (default 72:
#                         the first 72 test images hold every one of the 20 classes)
#   SPP_DEMO_SCALES=...   extract scales (default 688, the paper's 1-scale setting)
#   SPP_DEMO_ROW=...      ftfc7 (default: fine-tune fc6-fc8 on the training images and their mirrors,
#                         then SVMs on fc7 with box regression: the best row on validation at 200
#                         training images, bench/results/demo_recipe.json) or pool (SVMs on the pooled
#                         vector, no fine-tuning: 19.2 vs 22.1 on validation)
# With ../shared/data (the project's machines) it uses the VOC2007 slice and the SqueezeNet
# weights there; elsewhere it downloads VOC2007 and torchvision's ImageNet weights.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${SPP_DEMO_FULL:-0}" = 1 ]; then train=200; test=200; else train=${SPP_DEMO_TRAIN:-200}; test=${SPP_DEMO_TEST:-72}; fi
scales=${SPP_DEMO_SCALES:-688}
row=${SPP_DEMO_ROW:-ftfc7}
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

for split in trainval test; do
  n=$([ $split = trainval ] && echo $train || echo $test)
  $spp proposals --voc-root "$voc" --image-set $split --limit "$n" --out "$out/proposals-$split"
  $spp extract --voc-root "$voc" --image-set $split --limit "$n" --proposals "$out/proposals-$split" \
      --backbone squeezenet1_0 --weights "$weights" --scales "$scales" --out "$out/features-$split"
done
# train-svm's C defaults to 'auto': the release's 0.001, scaled to the training-set size.
if [ "$row" = pool ]; then
  $spp train-svm --cache "$out/features-trainval" --features pool --bbox --out "$out/svm"
else
  $spp extract --voc-root "$voc" --image-set trainval --limit "$train" --proposals "$out/proposals-trainval" \
      --backbone squeezenet1_0 --weights "$weights" --scales "$scales" --flip --out "$out/features-trainval-flip"
  $spp finetune --cache "$out/features-trainval" --cache "$out/features-trainval-flip" --out "$out/head" \
      --fc-dim 1024 --iterations 1200 --lr-steps 900 --lr 0.02
  # fc6/fc7 in bfloat16 while mining and detecting: 2-3x faster fc layers on CPUs with bf16 instructions
  # (README "Detection speed": the mAP cost of --precision bf16)
  $spp train-svm --cache "$out/features-trainval" --head "$out/head" --features fc7 --bbox --precision bf16 --out "$out/svm"
fi
fc_precision=$([ "$row" = pool ] && echo fp32 || echo bf16)
$spp detect --cache "$out/features-test" --svm "$out/svm" --bbox --precision "$fc_precision" --out "$out/detections"

echo
echo "== VOC2007 test mAP ($train trainval -> $test test images, scales $scales, SqueezeNet, $row + box regression) =="
$spp evaluate --voc-root "$voc" --image-set test --limit "$test" --detections "$out/detections" --plots "$out"
$spp show --detections "$out/detections" --voc-root "$voc" --image first:9 --threshold 0 --top 3 --out "$out/detections.png"
echo "Detections on the first 9 test images (SVM score > 0, the best 3 each; green correct, red wrong, ground truth dashed): $out/detections.png"
