"""Writes gateway/tests/data/scifact_slice from ../shared/data/scifact: the first 50 train
queries by id, their judgements, and a 250-document corpus (every judged document plus
seeded random others)."""
import json
import random

src = '../shared/data/scifact'
out = 'gateway/tests/data/scifact_slice'
qrels = {}
for line in open(f'{src}/qrels/train.tsv').read().splitlines()[1:]:
    q, d, s = line.split('\t')
    qrels.setdefault(q, {})[d] = int(s)
qids = sorted(qrels, key=int)[:50]
rel_docs = {d for q in qids for d in qrels[q]}
corpus = [json.loads(l) for l in open(f'{src}/corpus.jsonl')]
random.seed(7)
others = [c for c in corpus if c['_id'] not in rel_docs]
keep = [c for c in corpus if c['_id'] in rel_docs] + random.sample(others, 250 - len(rel_docs))
keep.sort(key=lambda c: int(c['_id']))
with open(f'{out}/corpus.jsonl', 'w') as f:
    for c in keep:
        f.write(json.dumps({'_id': c['_id'], 'title': c['title'], 'text': c['text']}) + '\n')
queries = {json.loads(l)['_id']: json.loads(l) for l in open(f'{src}/queries.jsonl')}
with open(f'{out}/queries.jsonl', 'w') as f:
    for q in qids:
        f.write(json.dumps({'_id': q, 'text': queries[q]['text']}) + '\n')
with open(f'{out}/qrels/train.tsv', 'w') as f:
    f.write('query-id\tcorpus-id\tscore\n')
    for q in qids:
        for d, s in qrels[q].items():
            f.write(f'{q}\t{d}\t{s}\n')
