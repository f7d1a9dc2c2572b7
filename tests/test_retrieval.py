"""RAFT rows on the real WikiTableQuestions training split (14,152 questions over 1,679 tables) when
../shared/data/wikitablequestions-train is there: every question's own table is found in the corpus, kept or left out
as drawn, never duplicated and never a distractor; the budget drops distractors before it touches a table."""
import tempfile
from pathlib import Path

import pytest

from jora.raft import wtq_corpus, wtq_questions
from jora.retrieval import CorpusIndex, raft_rows

WTQ_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitablequestions-train"
pytestmark = pytest.mark.skipif(not WTQ_TRAIN.is_dir(), reason=f"{WTQ_TRAIN} is absent (the full split is not in the "
                                "repository; ../shared/data holds it on the development machines)")


@pytest.fixture(scope="module")
def release():
    return CorpusIndex(wtq_corpus(WTQ_TRAIN)), wtq_questions(WTQ_TRAIN)


def test_every_training_question_gets_its_table_among_retrieved_distractors(release):
    index, questions = release
    assert (len(index), len(questions)) == (1679, 14152)
    rows, report = raft_rows(questions, index, distractors=4, oracle_probability=0.8, seed=0)
    assert report.rows == len(rows) == 14152 and report.fewer_distractors == 0
    for row in rows:
        assert len(row["document_ids"]) == len(set(row["document_ids"])) == 5
        assert (row["oracle_ids"][0] in row["document_ids"]) == row["oracle_kept"]
    left_out = report.oracle_left_out / len(rows)
    assert 0.18 < left_out < 0.22, left_out   # drawn per question with p = 0.8
    asked = questions[:2000]
    found = sum(q["oracle_id"] in top for q, top in zip(asked, index.search([q["question"] for q in asked], 10)))
    assert found / 2000 > 0.3, found  # BM25 finds the question's own table among the top 10 often: distractors are hard


def test_a_token_budget_drops_distractor_tables_first(release):
    from jora.data import load_tokenizer
    from jora.testing import save_tiny_hf_checkpoint
    index, questions = release
    tokenizer_folder = Path(tempfile.mkdtemp()) / "tiny"
    save_tiny_hf_checkpoint(tokenizer_folder, "llama3.1", corpus=[d.text for d in list(index.documents.values())[:300]],
                            vocab_size=2048)
    tokenizer = load_tokenizer(tokenizer_folder)
    rows, report = raft_rows(questions[:300], index, distractors=4, oracle_probability=1.0, tokenizer=tokenizer,
                             context_tokens=1024)
    from jora.data import prompt_tokens
    assert all(len(prompt_tokens(tokenizer, row["input"], special_tokens=False)[0]) <= 1024 for row in rows)
    assert report.distractors_dropped > 0 and report.oracle_cut < report.rows_with_distractors_dropped
    kept_whole = [row for number, row in enumerate(rows, start=1) if number not in report.cut_rows]
    for row in kept_whole[:50]:
        assert index.documents[row["oracle_ids"][0]].text in row["input"]   # the evidence is whole
