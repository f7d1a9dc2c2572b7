"""RAFT rows whose oracle is one long document (about 1 MB of text, far over the context budget), built for three
robustness settings (0, 2 and 4 distractors) as `retrieval_robustness` builds them, with a tiny byte-level tokenizer.

    python bench/long_document.py                                   # this tree
    git worktree add /tmp/jora-before dd7ec92                      # jora before 2026-12-07, for comparison
    PYTHONPATH=/tmp/jora-before python bench/long_document.py

Why it exists: `raft_rows` once tokenized a long oracle whole several times per row (the budget's bisection and the
oracle cut), in every setting; `CorpusIndex.text_within` now cuts it to the budget once per tokenizer and budget. One
JSON line: the seconds of each setting's `raft_rows` call for `--rounds` rounds (a fresh index each round), and the
report's cut figures, which must not change. Nothing is asserted: a timing is only a result on an idle machine.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import jora
from jora.data import load_tokenizer
from jora.retrieval import CorpusIndex, Document, raft_rows
from jora.testing import save_tiny_tokenizer

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--repeats", type=int, default=25_000, help="copies of a 38-character sentence in the document")
arguments = parser.parse_args()

tokenizer = load_tokenizer(save_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
long = " ".join(["the table lists the year and the city"] * arguments.repeats)
questions = [{"question": f"which city {i}?", "answer": "x", "oracle_ids": ["long"]} for i in range(4)]
rounds = []
for _ in range(arguments.rounds):
    index = CorpusIndex([Document("long", long)] + [Document(f"d{i}", f"document {i} about a city") for i in range(20)])
    seconds = []
    for distractors in (0, 2, 4):
        started = time.perf_counter()
        _, report = raft_rows(questions, index, distractors=distractors, seed=0, oracle_probability=1.0,
                              tokenizer=tokenizer, context_tokens=400)
        seconds.append(round(time.perf_counter() - started, 3))
    rounds.append(seconds)
print(json.dumps({"jora": str(Path(jora.__file__).parent), "document_characters": len(long), "questions": len(questions),
                  "seconds_per_setting": rounds, "total_seconds": [round(sum(r), 3) for r in rounds],
                  "oracle_cut": report.oracle_cut, "oracle_tokens_removed": report.oracle_tokens_removed}))
