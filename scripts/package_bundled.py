"""Copy a trained checkpoint into the package as the bundled model, stored in bfloat16 (half the bytes; glmkit
loads it back in float32). Usage: python scripts/package_bundled.py RUN/final glmkit/assets/glmkit-small"""

import sys

import torch

from glmkit import GLM
from glmkit.tokenizer import load_tokenizer

src, dest = sys.argv[1], sys.argv[2]
model = GLM.from_pretrained(src).to(torch.bfloat16)
model.save_pretrained(dest)
load_tokenizer(src).save_pretrained(dest)
print(f"{dest}: {sum(p.numel() for p in model.parameters()):,} parameters (bfloat16)")
