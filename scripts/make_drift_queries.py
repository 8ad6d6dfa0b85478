"""Writes gateway/tests/data/drift_queries.json from ../shared/data: 300 SciFact train queries
not among the 50 of scifact_slice (in-domain traffic for the slice's scientific corpus) and
the last 150 HaluEval QA dev questions (trivia about films, people and places: off-domain traffic)."""
import json
import random

sci = '../shared/data/scifact'
slice_ids = {json.loads(l)['_id'] for l in open('gateway/tests/data/scifact_slice/queries.jsonl')}
train = set()
for line in open(f'{sci}/qrels/train.tsv').read().splitlines()[1:]:
    train.add(line.split('\t')[0])
queries = [json.loads(l) for l in open(f'{sci}/queries.jsonl')]
in_domain = [q['text'] for q in queries if q['_id'] in train and q['_id'] not in slice_ids]
random.seed(11)
in_domain = random.sample(in_domain, 300)
halu = [json.loads(l) for l in open('../shared/data/halueval_qa/dev.jsonl')]
off_domain = [h['question'] for h in halu[-150:]]
with open('gateway/tests/data/drift_queries.json', 'w') as f:
    json.dump({'in_domain': in_domain, 'off_domain': off_domain}, f, indent=0)
print(len(in_domain), len(off_domain))
