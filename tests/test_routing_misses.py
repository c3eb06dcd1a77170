"""launch.routing_misses: the key overlap of a miss's routed document, against the
corpus's own questions (``SharedCorpus.question``) compared token by token."""
from launch import routing_misses
from msa_jax.data import write_task
from train_common import get_config


def test_key_overlaps_match_a_token_by_token_count():
  cfg = get_config("tiny")
  corpus = write_task.SharedCorpus(write_task.kv_config_of(cfg), cfg.seed)
  n, facts, key_len = 300, corpus.config.facts_per_doc, corpus.config.key_len
  keys = {(d, f): corpus.question(d, f)["question_tokens"][:key_len]
          for d in range(n) for f in range(facts)}
  doc_id = lambda d: corpus.question(d, 0)["doc_id"]

  def overlap(a, b):
    return sum(x == y for x, y in zip(a, b))

  answers = []
  for gold, fact, routed in ((5, 2, 5), (7, 0, 123), (250, 4, 9), (11, 1, None)):
    q = corpus.question(gold, fact)
    ranked = [] if routed is None else [doc_id(routed)]
    answers.append({"question_tokens": q["question_tokens"], "doc_id": q["doc_id"],
                    "ranked_doc_ids": [ranked]})
  result = routing_misses.key_overlaps(corpus, n, answers, block=128)
  rows = result["rows"]
  assert [r["routed"] for r in rows] == [5, 123, 9, None]
  assert rows[0]["routed_overlap"] is None and rows[3]["routed_overlap"] is None
  for row, (gold, fact, routed) in zip(rows[1:3], ((7, 0, 123), (250, 4, 9))):
    q_key = keys[(gold, fact)]
    assert row["routed_overlap"] == max(overlap(q_key, keys[(routed, f)])
                                        for f in range(facts))
  for row, (gold, fact) in zip(rows, ((5, 2), (7, 0), (250, 4), (11, 1))):
    q_key = keys[(gold, fact)]
    assert row["bank_best"] == max(overlap(q_key, k) for (d, f), k in keys.items()
                                   if (d, f) != (gold, fact))
  assert result["misses"] == 3 and result["questions"] == 4
  assert sum(result["miss_overlap_counts"].values()) == 3
