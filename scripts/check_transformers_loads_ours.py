#!/usr/bin/env python3
"""Loads a folder written by `trainer export` with transformers and compares its logits with
the fixture's reference. Called by scripts/check-transformers-loads-ours."""
import hashlib
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file

fixture, ours = sys.argv[1], sys.argv[2]
reference = load_file(os.path.join(fixture, "reference.safetensors"))
meta = json.load(open(os.path.join(fixture, "reference.json")))
model = transformers.AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
error = 0.0
with torch.no_grad():
    for i, ids in enumerate(meta["prompt_ids"]):
        logits = model(torch.tensor([ids])).logits[0]
        error = max(error, (logits - reference[f"single_{i}_logits"]).abs().max().item())
record = {
    "loaded": True,
    "max_abs_error": error,
    "class": type(model).__name__,
    "transformers": transformers.__version__,
    "sha256": {f: hashlib.sha256(open(os.path.join(ours, f), "rb").read()).hexdigest()
               for f in ["config.json", "model.safetensors"]},
}
with open(os.path.join(fixture, "transformers_loads_ours.json"), "w") as f:
    json.dump(record, f, indent=1)
print(f"{os.path.basename(fixture.rstrip('/'))}: transformers loaded ours, max abs error {error:.2e}")
assert error < 1e-4, "transformers disagrees with the reference"
