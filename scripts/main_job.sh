#!/usr/bin/env bash
# The main job: set up, train TransNeXt-femto from scratch on Fashion-MNIST within a
# fixed wall-time budget, evaluate it, and show a few test predictions.
#   bash scripts/main_job.sh            (OUT=runs/fashion-mnist-femto by default)
# Environment: OUT (output folder), BUDGET (training seconds, default 480),
#              MAX_EPOCHS (default 12), DEVICE (cpu|cuda, default: cuda if present),
#              THREADS (CPU threads, default 1: on a shared 2-core machine one thread is
#              steady, two can be many times slower when the other core is busy; 'auto'
#              measures both early in epoch 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
bash scripts/setup.sh
setup_done=$(date +%s)

OUT=${OUT:-runs/fashion-mnist-femto}
BUDGET=${BUDGET:-480}
MAX_EPOCHS=${MAX_EPOCHS:-12}
PY=.venv/bin/python
DEV=()
if [ -n "${DEVICE:-}" ]; then DEV=(--device "$DEVICE"); fi
rm -rf "$OUT"

echo "== train: transnext_femto on Fashion-MNIST (at most ${MAX_EPOCHS} epochs, ${BUDGET}s budget)"
$PY -m transnext train --recipe fmnist-femto --output "$OUT" --epochs "$MAX_EPOCHS" \
    --time-budget "$BUDGET" --eval-interval 1000 --threads "${THREADS:-1}" "${DEV[@]}"
# the thread count the training run measured as faster on this machine
THREADS=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))[-1]['threads'])" "$OUT/metrics.json")

echo
echo "== evaluate $OUT/last.pth on the 10,000 test images"
$PY -m transnext eval --model transnext_femto --checkpoint "$OUT/last.pth" \
    --dataset fashion-mnist --input-size 28 32 --batch-size 500 --workers 0 \
    --json "$OUT/eval.json" --threads "$THREADS" "${DEV[@]}"

echo
echo "== predictions for a few test images (true label in the file name)"
$PY - "$OUT/samples" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
from transnext.data import fashion_mnist_classes, load_fashion_mnist
x, y = load_fashion_mnist(None, "test")
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
names = fashion_mnist_classes()
for i in (0, 1, 2, 3, 4, 5, 6, 7):
    label = names[int(y[i])].replace("/", "-").replace(" ", "-")
    Image.fromarray(x[i].numpy()).save(out / f"test{i:05d}_true-{label}.png")
PYEOF
$PY -m transnext predict "$OUT"/samples/*.png --model transnext_femto \
    --checkpoint "$OUT/last.pth" --topk 1 --json "$OUT/predictions.json" --threads "$THREADS" \
    "${DEV[@]}"
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
preds = json.loads((out / "predictions.json").read_text())
ok = 0
for p in preds:
    true = Path(p["image"]).stem.split("_true-")[1]
    got = p["top"][0]["label"].replace("/", "-").replace(" ", "-")
    ok += true == got
print(f"{ok}/{len(preds)} of the sample predictions match their true labels")
row = json.loads((out / "eval.json").read_text())["rows"][0]
print(f"test accuracy (top-1, 28x28): {row['top1']:.2f}%  -> checkpoint {out / 'last.pth'}")
PYEOF
end=$(date +%s)
echo "main job wall time: $((end - start))s (set-up $((setup_done - start))s, "\
"train + eval + predict $((end - setup_done))s)"
