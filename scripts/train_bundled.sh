#!/usr/bin/env bash
# Rebuild the bundled model from scratch (about an hour on 2 CPU cores):
#   corpus (Debian's bible-kjv) -> BPE tokenizer -> token shards -> pretraining -> glmkit/assets/glmkit-small
set -euo pipefail
cd "$(dirname "$0")/.."
command -v bible >/dev/null || apt-get install -y bible-kjv
python scripts/get_kjv_corpus.py data/kjv/kjv.txt
glmkit train-tokenizer data/kjv/kjv.txt --out data/kjv/tokenizer --vocab-size 8192
glmkit prepare-data data/kjv/kjv.txt --tokenizer data/kjv/tokenizer --out data/kjv/shards --val-fraction 0.05 --overwrite
glmkit pretrain --config configs/glmkit-small.yaml "$@"
python scripts/package_bundled.py runs/glmkit-small/final glmkit/assets/glmkit-small
glmkit eval-cloze --model glmkit/assets/glmkit-small --data data/kjv/shards
