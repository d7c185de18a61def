"""Ceiling check: full-rank interchange (feature_dim = d, no training) at the entity's last
token, per layer, on the city/country test split (200, seed 0, model labels)."""
import json, sys, time, torch
from hyperdas_fast.models.mdas import MDAS
from hyperdas_fast.data import ravel
from hyperdas_fast.evaluation.metrics import evaluate
print("threads", torch.get_num_threads(), flush=True)
m = MDAS(layer=1, feature_dim=576)
recs = ravel.load_dataset("city", "country", "test", model=m.target, tokenizer=m.tokenizer, label_mode="model",
                          max_examples=200, seed=0)
out = {}
for layer in [int(x) for x in sys.argv[1].split(",")]:
    w = MDAS(m.target, layer=layer, feature_dim=576, tokenizer=m.tokenizer)
    t = time.time()
    r = evaluate(w.model, recs, w.collator, modes=("groundtruth",), batch_size=32)
    out[layer] = r["groundtruth"]["overall"]
    print(layer, json.dumps(out[layer]), round(time.time() - t), flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
