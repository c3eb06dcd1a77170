import json
from msa_jax import evaluate
for k in (2, 4, 8):
  res = evaluate.run_bank("/tmp/rt/train_document", "/tmp/miss/banks/train_document_256x",
                          "/tmp/miss/questions_315_64.jsonl", batch_size=16, top_k=k,
                          out=f"/tmp/miss/eval_256x_top{k}.json")
  print(k, {key: res[key] for key in res if "recall" in key or "exact" in key}, res["failures"], flush=True)
