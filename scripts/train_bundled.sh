#!/usr/bin/env bash
# Rebuild the bundled model from scratch:
#   corpus (Debian's bible-kjv) -> BPE tokenizer -> token shards -> pretraining -> glmkit/assets/glmkit-small
# CONFIG=configs/glmkit-small-rope.yaml (default: the shipped model, 2D rotary positions, 19 min on 2 CPU cores);
# the learned-table recipes configs/glmkit-small.yaml (52 min) and glmkit-small-gpu.yaml (6.5 min on an H200).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v bible >/dev/null || apt-get install -y bible-kjv
python scripts/get_kjv_corpus.py data/kjv/kjv.txt
glmkit train-tokenizer data/kjv/kjv.txt --out data/kjv/tokenizer --vocab-size 8192
glmkit prepare-data data/kjv/kjv.txt --tokenizer data/kjv/tokenizer --out data/kjv/shards --val-fraction 0.05 --overwrite
CONFIG=${CONFIG:-configs/glmkit-small-rope.yaml}
OUT_DIR=$(python -c "from glmkit.train.pretrain import load_config; print(load_config('$CONFIG').train.out_dir)")
glmkit pretrain --config "$CONFIG" "$@"
python scripts/package_bundled.py "$OUT_DIR/final" glmkit/assets/glmkit-small
glmkit eval-cloze --model glmkit/assets/glmkit-small --data data/kjv/shards
