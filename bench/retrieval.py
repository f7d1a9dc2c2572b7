"""Retrieval speed: BM25 indexing and search with bm25s, and RAFT rows, on synthetic and on real data.

    python bench/retrieval.py                       # 100,000 documents, 10,000 questions, 3 repeats
    python bench/retrieval.py --documents 2000 --questions 200 --repeats 1 --results DIR   # a quick check (tests)

Synthetic documents (20 words) and questions (8 words) are drawn from a Zipf-distributed vocabulary of 30,000 words
(seeded), each question sharing words with its oracle document. Measured, each `--repeats` times (min, median, max):
building the index, retrieving the top 10 for every question, and building RAFT rows (4 distractors) for every
question, without a tokenizer and with a token budget (a tiny byte-level tokenizer trained in place). Where
../shared/data/wikitablequestions-train exists, the same for the real WikiTableQuestions training split (1,679 tables,
14,152 questions). Everything is written to bench/results/retrieval.json; nothing asserts a timing.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WTQ_TRAIN = ROOT.parent / "shared" / "data" / "wikitablequestions-train"
sys.path.insert(0, str(ROOT))

from jora.retrieval import CorpusIndex, raft_rows, read_corpus  # noqa: E402


def synthetic(documents: int, questions: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    "Short documents and questions whose oracle is a document they share words with."
    random = np.random.default_rng(seed)
    vocabulary = np.array([f"w{number}" for number in range(30_000)])
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    words = random.choice(vocabulary, size=(documents, 20), p=weights / weights.sum())
    corpus = [{"id": f"d{number}", "text": " ".join(row)} for number, row in enumerate(words)]
    oracles = random.integers(0, documents, size=questions)
    asked = [{"id": f"q{number}", "question": " ".join(random.choice(words[oracle], size=8, replace=False)),
              "answer": words[oracle][0], "oracle_id": f"d{oracle}"} for number, oracle in enumerate(oracles)]
    return corpus, asked


def timed(action, repeats: int) -> tuple[dict, object]:
    "Seconds of `action` over `repeats` runs (min, median, max) and its last result."
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - start)
    return {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)}, result


def tiny_tokenizer(texts: list[str]):
    from jora.data import load_tokenizer
    from jora.testing import save_tiny_hf_checkpoint
    folder = Path(tempfile.mkdtemp()) / "tiny"
    save_tiny_hf_checkpoint(folder, "llama3.1", corpus=texts[:2000], vocab_size=2048)
    return load_tokenizer(folder)


def measure(name: str, corpus: list[dict], questions: list[dict], repeats: int, budget: int) -> dict:
    "Index, search and RAFT rows (plain and within a token budget) for one corpus and its questions."
    documents = read_corpus(corpus)
    index_seconds, index = timed(lambda: CorpusIndex(documents), repeats)
    search_seconds, found = timed(lambda: index.search([q["question"] for q in questions], 10), repeats)
    rows_seconds, (rows, report) = timed(lambda: raft_rows(questions, index, distractors=4), repeats)
    tokenizer = tiny_tokenizer([d["text"] for d in corpus])
    budgeted = questions[:1000]
    budget_seconds, (_, budget_report) = timed(
        lambda: raft_rows(budgeted, index, distractors=4, tokenizer=tokenizer, context_tokens=budget), repeats)
    oracle_found = sum(q["oracle_id"] in top for q, top in zip(questions, found)) / len(questions)
    return {"name": name, "documents": len(documents), "questions": len(questions),
            "index_seconds": index_seconds, "search_top10_seconds": search_seconds,
            "queries_per_second": len(questions) / search_seconds["median"], "oracle_in_top10": oracle_found,
            "raft_rows_seconds": rows_seconds, "rows_per_second": len(questions) / rows_seconds["median"],
            "raft_rows_report": str(report), "budget_tokens": budget, "budgeted_questions": len(budgeted),
            "raft_rows_with_budget_seconds": budget_seconds,
            "budgeted_rows_per_second": len(budgeted) / budget_seconds["median"],
            "raft_rows_with_budget_report": str(budget_report)}


def wikitablequestions() -> tuple[list[dict], list[dict]]:
    from jora.raft import wtq_corpus, wtq_questions
    return [document._asdict() for document in wtq_corpus(WTQ_TRAIN)], wtq_questions(WTQ_TRAIN)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--questions", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--no-wikitablequestions", action="store_true")
    arguments = parser.parse_args(argv)
    corpus, questions = synthetic(arguments.documents, arguments.questions)
    rows = [measure("synthetic", corpus, questions, arguments.repeats, budget=256)]
    print(json.dumps(rows[-1], indent=1))
    if WTQ_TRAIN.is_dir() and not arguments.no_wikitablequestions:
        rows.append(measure("wikitablequestions-train", *wikitablequestions(), arguments.repeats, budget=1024))
        print(json.dumps(rows[-1], indent=1))
    results = {"command": "python bench/retrieval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()},
               "rows": rows}
    Path(arguments.results).mkdir(parents=True, exist_ok=True)
    (Path(arguments.results) / "retrieval.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
