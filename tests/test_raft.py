"""The case-study loaders on the real-format samples, the WikiTableQuestions answer rules, and the Table 2 metrics."""
import json
from pathlib import Path

import pytest

from jora.raft import (directionality_examples, directionality_metrics, fourchan_records, link_target, parse_comment,
                       parse_post_number, read_threads, read_wtq_questions, read_wtq_table, serialize_table,
                       split_answers, thread_split, unescape_wtq, wtq_records)
from jora.evaluate import wtq_correct

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
WTQ, POL = SAMPLES / "wikitablequestions-sample", SAMPLES / "4chan-sample" / "pol_sample.ndjson"


def test_wtq_questions_and_answers():
    training, unseen = read_wtq_questions(WTQ), read_wtq_questions(WTQ, "data/pristine-unseen-tables.tsv")
    assert len(training) == 60 and len(unseen) == 40
    assert training[0] == {"id": "nt-0", "question": "what was the last year where this team was a part of the usl a-league?",
                           "context": "csv/204-csv/590.csv", "answers": ["2004"]}
    several = {q["id"]: q["answers"] for q in unseen if len(q["answers"]) > 1}
    assert ["Italy", "Russia", "China"] in several.values()
    assert split_answers(r"a\pb|c\\d|e\nf") == ["a|b", "c\\d", "e\nf"]
    assert unescape_wtq(r"x\\n") == "x\\n"  # an escaped backslash followed by n is not a newline


def test_wtq_tables_tsv_and_csv_agree(tmp_path):
    with_escapes = read_wtq_table(WTQ, "csv/203-csv/128.csv")
    assert with_escapes[1][2] == "\\0"  # '\\0' in the .tsv is a backslash and a zero
    squeeze = lambda table: [[" ".join(cell.split()) for cell in row] for row in table]  # the .tsv turns nbsp into spaces
    for context in ("csv/203-csv/104.csv", "csv/201-csv/21.csv", "csv/203-csv/128.csv"):
        (tmp_path / context).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / context).write_bytes((WTQ / context).read_bytes())  # the .csv alone
        assert squeeze(read_wtq_table(tmp_path, context)) == squeeze(read_wtq_table(WTQ, context)), context
    with pytest.raises(FileNotFoundError, match="Table csv/209-csv/1.csv not found"):
        read_wtq_table(WTQ, "csv/209-csv/1.csv")


def test_table_serialisation_and_row_budget():
    rows = [["Name", "Year"], ["Ann\nLee", "2001"], ["Bo", "2002"], ["Cy", "2003"]]
    assert serialize_table(rows) == "Name | Year\nrow 1: Ann Lee | 2001\nrow 2: Bo | 2002\nrow 3: Cy | 2003"

    class WordTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    cut = serialize_table(rows, WordTokenizer(), max_tokens=16)
    assert cut.startswith("Name | Year\nrow 1: Ann Lee | 2001") and cut.endswith("(2 more rows not shown)")
    assert len(cut.split()) <= 16
    records = wtq_records(WTQ)
    assert len(records) == 60 and records[0]["instruction"].startswith("what was the last year")
    assert records[0]["input"].split("\n")[0].count("|") >= 1 and records[0]["output"] == "2004"


@pytest.mark.parametrize("answers, predicted, right", [
    (["2004"], ["2004"], True), (["2004"], ["2004.0"], True), (["3"], ["3.0000001"], True), (["3"], ["3.01"], False),
    (["Sweden (SWE)"], ["Sweden"], True), (["Bangkok, Thailand"], ["bangkok, thailand"], True),
    (["1920–1932"], ['"1920-1932"'], True), (["Café"], ["cafe."], True), (["Paris[1]"], ["paris"], True),
    (["2010-05-xx"], ["2010-05-xx"], True), (["2010-05-xx"], ["2010-06-xx"], False),
    (["Italy", "Russia", "China"], ["china", "italy", "russia"], True), (["Italy", "Russia"], ["Italy"], False),
    (["Italy"], ["Italy", "Spain"], False), (["12,467"], ["12467"], False),
])
def test_wtq_official_rules(answers, predicted, right):
    assert wtq_correct(answers, predicted) is right


def test_4chan_threads_targets_and_links():
    threads = list(read_threads(POL))
    assert len(threads) == 40 and sum(len(t) for t in threads) == 365
    first = {post["no"]: post for post in threads[0]}
    replier = first[101000119]
    assert replier["targets"] == [101000041, 101000095]  # '#p' link and a same-thread '/pol/thread/OP#p' link
    assert "<" not in replier["text"] and ">>101000095" in replier["text"]
    text, links = parse_comment('<span class="deadlink">&gt;&gt;5</span><br><span class="quote">&gt;green</span>'
                                'caf&eacute;<wbr>s &amp; more<a href="//boards.4chan.org/b/thread/9#p9" class="quotelink">&gt;&gt;9</a>')
    assert text == ">>5\n>greencafés & more>>9" and links == ["//boards.4chan.org/b/thread/9#p9"]
    assert link_target("//boards.4chan.org/b/thread/9#p9", 9) is None  # another board
    assert link_target("/pol/thread/123#p7", 456) is None  # another thread
    assert link_target("#p7", 456) == 7
    assert parse_comment(None) == ("", [])
    for thread in threads:  # dead links and foreign links never become targets
        numbers = {post["no"] for post in thread}
        assert all(set(post["targets"]) <= numbers for post in thread)


def test_directionality_examples_and_splits():
    posts = [{"no": 10, "text": "op", "targets": []}, {"no": 11, "text": "a", "targets": [10]},
             {"no": 12, "text": "", "targets": [10, 11]}]
    examples = directionality_examples(posts)
    assert examples[0]["input"] == "[1] No.10: op\n[2] No.11: a\n[3] No.12: (no text)"
    targets = [e for e in examples if e["kind"] == "target"]
    replies = [e for e in examples if e["kind"] == "reply"]
    assert [(e["post"], e["output"], e["correct"]) for e in targets] == [(2, "[1]", [1]), (3, "[1]", [1, 2])]
    assert [(e["post"], e["output"], e["correct"]) for e in replies] == [(1, "[2]", [2, 3]), (2, "[3]", [3])]
    train, test = fourchan_records(POL, "train"), fourchan_records(POL, "test")
    assert train and test and not {e["thread"] for e in train} & {e["thread"] for e in test}
    assert [thread_split(n) for n in (1, 2, 3)] == [thread_split(n) for n in (1, 2, 3)]
    assert fourchan_records(POL, "test") == test


def test_metrics_on_hand_made_predictions():
    posts = [{"no": 10, "text": "op", "targets": []}, {"no": 11, "text": "a", "targets": [10]},
             {"no": 12, "text": "b", "targets": [11]}]
    examples = directionality_examples(posts)  # target: post 2 -> 1, post 3 -> 2; reply: post 1 <- 2, post 2 <- 3
    by_key = {(e["kind"], e["post"]): i for i, e in enumerate(examples)}
    predictions = [None] * len(examples)
    predictions[by_key[("target", 2)]] = 1   # right
    predictions[by_key[("target", 3)]] = 1   # wrong (3 quotes 2)
    predictions[by_key[("reply", 1)]] = 2    # right
    predictions[by_key[("reply", 2)]] = None  # no answer: wrong
    metrics = directionality_metrics(examples, predictions)
    assert metrics["target_post_accuracy"] == 0.5 and metrics["reply_post_accuracy"] == 0.5
    assert metrics["p_reply_given_target"] == 1.0  # the only right target (2 -> 1) has its reply (1 <- 2) right
    assert parse_post_number("It is post [12].") == 12 and parse_post_number("7") == 7 and parse_post_number("none") is None


def test_two_phase_pipeline_end_to_end(tmp_path):
    "base -> LoRA on WikiTableQuestions -> merge -> LoRA on 4chan -> Table 2, on the samples with a tiny model."
    from jora.testing import save_tiny_hf_checkpoint
    from jora.raft import CaseStudy, case_study_config, evaluate_study, run_phase_one, run_phase_two
    from jora.files import latest_checkpoint
    corpus = [r["instruction"] + "\n" + r["input"] for r in wtq_records(WTQ)[:10]] + \
             [e["input"] for e in fourchan_records(POL, "train")[:10]]
    save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", corpus=corpus)
    study = CaseStudy(base_model=str(tmp_path / "base"), wikitablequestions=str(WTQ), fourchan=str(POL),
                      work_dir=str(tmp_path / "study"), max_train_questions=40, max_test_questions=8,
                      max_wtq_test_questions=6)
    small = lambda phase: case_study_config(study, phase)._replace(N_EPOCHS=1, MAX_SEQ_LEN=384)
    study = study._replace(phase_one=small(1), phase_two=small(2))
    one = run_phase_one(study)
    assert one["examples"] == 40 and (tmp_path / "study" / "phase1-merged" / "model.safetensors").is_file()
    assert one["result"].history[-1]["loss"] < one["result"].history[0]["loss"]
    weights, record = tmp_path / "study" / "phase1-merged" / "model.safetensors", tmp_path / "study" / "phase1-merged.json"
    merged_at = weights.stat().st_mtime_ns
    assert run_phase_one(study)["merged"] == one["merged"] and weights.stat().st_mtime_ns == merged_at  # kept on a rerun
    record.write_text(json.dumps({"merged_from": "another checkpoint"}))
    run_phase_one(study)  # merged from something else: merged again
    assert weights.stat().st_mtime_ns != merged_at and json.loads(record.read_text())["merged_from"] != "another checkpoint"
    two = run_phase_two(study)
    assert two["examples"] == len(fourchan_records(POL, "train"))
    assert case_study_config(study, 2).LLAMA2_HF_PATH.endswith("phase1-merged")
    assert latest_checkpoint(tmp_path / "study" / "phase2-checkpoints") is not None
    results = evaluate_study(study)
    table = results["table2"]
    assert list(table.index) == ["base", "WTQ only (phase 1)", "RAFT (WTQ -> 4chan)", "baseline: opening post",
                                 "baseline: adjacent post", "baseline: uniform random (expected)"]
    assert {"target_post_accuracy", "target_post_accuracy_low", "target_post_accuracy_high", "reply_post_accuracy",
            "p_reply_given_target", "target_questions", "threads"} <= set(table.columns)
    from jora.raft import whole_threads
    scored = whole_threads(fourchan_records(POL, "test"), 8)
    assert table["target_post_accuracy"].between(0, 1).all() and (table["questions"] == len(scored)).all()
    measured = table.dropna(subset=["target_post_accuracy_low"])
    assert ((measured["target_post_accuracy_low"] <= measured["target_post_accuracy"]) &
            (measured["target_post_accuracy"] <= measured["target_post_accuracy_high"])).all()
    assert list(results["wtq"].index) == ["base", "WTQ only (phase 1)"] and (results["wtq"]["questions"] == 6).all()
    written = json.loads((tmp_path / "study" / "results.json").read_text())
    assert written["table2"]["base"]["questions"] == len(scored) and written["study"]["max_wtq_test_questions"] == 6
    kept = sorted(p.name for p in (tmp_path / "study" / "evaluation").iterdir())
    assert kept == ["4chan-base.json", "4chan-raft-wtq-4chan.json", "4chan-wtq-only-phase-1.json", "wtq-base.json",
                    "wtq-wtq-only-phase-1.json"]
    before = {name: (tmp_path / "study" / "evaluation" / name).stat().st_mtime_ns for name in kept}
    again = evaluate_study(study)  # a rerun reuses every kept answer, and gives the same table
    assert {name: (tmp_path / "study" / "evaluation" / name).stat().st_mtime_ns for name in kept} == before
    assert again["table2"].equals(table)


def test_the_loaders_give_chat_records_as_an_option():
    from jora.data import read_records
    from jora.raft import random_baseline_metrics
    alpaca, chat = wtq_records(WTQ)[:3], wtq_records(WTQ, chat=True)[:3]
    for plain, conversation in zip(alpaca, chat):
        assert conversation["messages"] == [{"role": "user", "content": plain["instruction"]},
                                            {"role": "assistant", "content": plain["output"]}]
        assert conversation["context"] == plain["input"] and conversation["answers"] == plain["answers"]
    assert read_records(chat)[0]["context"] == alpaca[0]["input"]  # a valid chat record
    threads, threads_chat = fourchan_records(POL, "test"), fourchan_records(POL, "test", chat=True)
    assert [e["correct"] for e in threads] == [e["correct"] for e in threads_chat]
    assert random_baseline_metrics(threads) == random_baseline_metrics(threads_chat)


class CountingTokenizer:
    "Whitespace tokens with character offsets, counting its calls (how often a text is tokenized)."
    calls = 0

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False, **ignored):
        import re
        type(self).calls += 1
        spans = [match.span() for match in re.finditer(r"\S+", text)]
        return {"input_ids": [hash(text[a:b]) % 1000 for a, b in spans], "offset_mapping": spans}


def test_a_long_table_is_cut_with_a_few_tokenizations():
    """A 300-row table cut to a budget by bisection over the rows: about log2(300) tokenizations, not one per row
    dropped (the whole training split's phase-one records then take seconds, not minutes); the table that fits whole
    is not cut for the "(0 more rows not shown)" it does not show."""
    rows = [["Name", "Year"]] + [[f"person {i}", str(1900 + i)] for i in range(300)]
    counter = CountingTokenizer()
    CountingTokenizer.calls = 0
    cut = serialize_table(rows, counter, max_tokens=200)
    assert CountingTokenizer.calls <= 12, CountingTokenizer.calls
    kept = cut.count("\n")   # the header, the rows shown and the note
    assert cut.endswith(f"({301 - kept} more rows not shown)") and len(cut.split()) <= 200
    longer = cut.rsplit("\n", 1)[0] + f"\nrow {kept}: person {kept - 1} | {1900 + kept - 1}\n({300 - kept} more rows not shown)"
    assert len(longer.split()) > 200   # one more row would not fit: the most rows that fit are shown
    whole = serialize_table(rows[:4], counter, max_tokens=len(serialize_table(rows[:4]).split()))
    assert whole == serialize_table(rows[:4])


def test_an_oracle_over_the_budget_is_cut_without_trying_distractors():
    """When the oracle alone exceeds the context budget no distractor can fit, so none is tried: three tokenizations
    (the oracle's context, its tokens, the cut context checked), where trying distractors first took nine."""
    from jora.retrieval import RaftReport, fit_budget
    report = RaftReport()
    CountingTokenizer.calls = 0
    oracles, distractors = fit_budget(CountingTokenizer(), 50, ["word " * 80], ["other " * 30] * 4, report, 1)
    assert CountingTokenizer.calls <= 3, CountingTokenizer.calls
    assert distractors == [] and report.distractors_dropped == 4 and report.oracle_cut == 1
    assert len(("<document 1>\n" + oracles[0] + "\n</document 1>").split()) <= 50
    assert report.oracle_tokens_removed == 80 + 4 - 50


def test_question_limits_are_seeded_samples_and_test_threads_stay_whole():
    """`max_questions` draws a seeded sample in file order (the first N questions share few tables); the 4chan test
    questions are cut at thread boundaries, so p(Reply|Target) never sees a target without its thread's replies."""
    from jora.raft import sample_questions, whole_threads, wtq_questions
    every = wtq_questions(WTQ)
    drawn = wtq_questions(WTQ, max_questions=12, seed=3)
    assert len(drawn) == 12 and drawn == wtq_questions(WTQ, max_questions=12, seed=3) != wtq_questions(WTQ, max_questions=12, seed=4)
    assert drawn != every[:12] and [every.index(q) for q in drawn] == sorted(every.index(q) for q in drawn)
    assert [r["id"] for r in wtq_records(WTQ, max_questions=12, seed=3)] == [q["id"] for q in drawn]
    assert sample_questions(every, None) == every == sample_questions(every, 1000)
    with pytest.raises(ValueError, match="at least 1"):
        sample_questions(every, 0)
    examples = fourchan_records(POL, "test")
    sizes = {}
    for example in examples:
        sizes[example["thread"]] = sizes.get(example["thread"], 0) + 1
    first, second = list(sizes.values())[:2]
    kept = whole_threads(examples, first + second - 1)   # the second thread does not fit whole: it is left out
    assert len(kept) == first and {e["thread"] for e in kept} == {examples[0]["thread"]}
    assert whole_threads(examples, 1) == kept[:first] and whole_threads(examples, None) == examples
    assert len(whole_threads(examples, first + second)) == first + second


def test_the_paper_scale_study_file_runs_on_a_tiny_model(tmp_path):
    """`jora study --config configs/case-study-llama2-7b.toml`, the paper-scale file, on the CPU: the same code path
    with a tiny model, the samples and smaller numbers set with --set; Table 2 printed and written. The 7B and 13B
    files load as they are, and a wrong value is one line naming the table and the key."""
    import subprocess
    import sys
    from jora.raft import study_from_toml
    from jora.testing import save_tiny_hf_checkpoint
    configs = Path(__file__).resolve().parents[1] / "configs"
    for size in ("7b", "13b"):
        study = study_from_toml(configs / f"case-study-llama2-{size}.toml")
        assert study.distractors == 4 and study.phase_one.LORA_R == study.phase_two.LORA_R == 16
        assert study.phase_one.DTYPE == "bfloat16" and study.phase_one.LORA_TARGETS == ("q_proj", "v_proj")
    corpus = [r["instruction"] + "\n" + r["input"] for r in wtq_records(WTQ)[:10]] + \
             [e["input"] for e in fourchan_records(POL, "train")[:10]]
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", corpus=corpus)
    small = [f"{phase}.{setting}" for phase in ("phase_one", "phase_two") for setting in
             ("DTYPE=float32", "REMAT=none", "MAX_STEPS=2", "BATCH_SIZE=2", "N_ACCUMULATION_STEPS=1", "MAX_SEQ_LEN=512",
              "NUM_GPUS=1", "WARMUP_STEPS=0")]
    small += [f"study.base_model={base}", f"study.wikitablequestions={WTQ}", f"study.fourchan={POL}",
              f"study.work_dir={tmp_path / 'study'}", "study.max_train_questions=8", "study.max_test_questions=8",
              "study.max_wtq_test_questions=4", "study.robustness_questions=0",
              "study.document_tokens=96", "study.table_tokens=384"]
    jora = [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())", "study", "--config",
            str(configs / "case-study-llama2-7b.toml")]
    done = subprocess.run([*jora, *(part for change in small for part in ("--set", change))], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Table 2: {tmp_path / 'study' / 'table2.csv'}" in done.stdout and "RAFT (WTQ -> 4chan)" in done.stdout
    written = (tmp_path / "study" / "table2.csv").read_text().splitlines()
    assert written[0].startswith(",target_post_accuracy") and len(written) == 7
    assert "Held-out WikiTableQuestions" in done.stdout and (tmp_path / "study" / "results.json").is_file()
    state = json.loads(next((tmp_path / "study" / "phase1-checkpoints").glob("step-*/state.json")).read_text())
    assert state["step"] == 2 and state["config"]["LORA_ALPHA"] == 16 and state["config"]["LR"] == 1e-4
    refused = subprocess.run([*jora, "--set", "phase_two.LORA_R=2.5"], capture_output=True, text=True, timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1 and "[phase_two]: LORA_R=2.5" in lines[0], refused.stderr


def test_every_reply_target_can_be_found_in_its_thread():
    "A reply quotes `>>number`, and the context shows each post's number, so a target question has its answer in view."
    import re
    examples = [e for e in fourchan_records(POL, "train") if e["kind"] == "target"]
    assert len(examples) > 100
    for example in examples:
        lines = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^\[(\d+)\] No\.(\d+):", example["input"], re.M)}
        assert len(lines) == example["posts"]
        post_text = example["input"].split(f"[{example['post']}] No.{lines[example['post']]}:")[1].split("\n[")[0]
        quoted = {int(n) for n in re.findall(r">>(\d+)", post_text)}
        assert lines[example["correct"][0]] in quoted


def test_the_random_baseline_counts_posts_not_lines():
    from jora.raft import random_baseline_metrics
    posts = [{"no": 10, "text": "op\nwith\nthree lines", "targets": []}, {"no": 11, "text": "a", "targets": [10]},
             {"no": 12, "text": "b\nc", "targets": [11]}]
    metrics = random_baseline_metrics(directionality_examples(posts))
    assert metrics["target_post_accuracy"] == 0.5  # one right among the 2 other posts, for both target questions
    assert metrics["reply_post_accuracy"] == 0.5


def test_held_out_tables_are_never_trained_on_nor_distractors(tmp_path):
    from transformers import AutoTokenizer
    from jora.testing import save_tiny_tokenizer
    from jora.raft import CaseStudy, case_study_config, phase_one_records, study_tables, wtq_test_rows
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "tokenizer"), trust_remote_code=False)
    study = CaseStudy(base_model="unused", wikitablequestions=str(WTQ), fourchan=str(POL), work_dir="unused",
                      distractors=2, wtq_test_tables=0.3)
    config = case_study_config(study, 1)
    train, test = study_tables(study, "train", config.SEED), study_tables(study, "test", config.SEED)
    questions = read_wtq_questions(WTQ)
    held_out = {q["context"] for q in questions if test(q["context"])}
    assert 0 < len(held_out) < len({q["context"] for q in questions})
    assert all(train(c) != test(c) for c in {q["context"] for q in questions})
    rows, report = phase_one_records(study, tokenizer, config)
    assert len(rows) == sum(not test(q["context"]) for q in questions)
    assert not {d for row in rows for d in row["document_ids"]} & held_out  # neither oracle nor distractor
    test_rows = wtq_test_rows(study, tokenizer, config, None)
    assert {row["oracle_ids"][0] for row in test_rows} == held_out and all(row["oracle_kept"] for row in test_rows)
    assert CaseStudy(base_model="", wikitablequestions="", fourchan="", work_dir="").wtq_test_tables == 0
    assert study_tables(study._replace(wtq_test_tables=0.0), "test", 0) is None  # no share: the test file scores


def test_answers_are_kept_and_reused_only_for_the_same_rows_and_model(tmp_path):
    from jora.raft import cached_answers
    calls = []
    answer = lambda rows: calls.append(len(rows)) or [row["q"].upper() for row in rows]
    rows = [{"q": "a"}, {"q": "b"}]
    assert cached_answers(tmp_path / "kept.json", rows, "model-1", answer) == ["A", "B"]
    assert cached_answers(tmp_path / "kept.json", rows, "model-1", answer) == ["A", "B"] and calls == [2]
    cached_answers(tmp_path / "kept.json", rows, "model-2", answer)  # another model: answered again
    cached_answers(tmp_path / "kept.json", rows[:1], "model-2", answer)  # other rows: answered again
    assert calls == [2, 2, 1] and not list(tmp_path.glob("*.partial"))


def test_a_phase_stopped_early_stops_the_study_and_is_not_merged(tmp_path):
    "A SIGTERM or stop request during phase 1 once merged its unfinished adapters and went on to phase 2."
    import threading
    from jora.testing import save_tiny_hf_checkpoint
    from jora.raft import CaseStudy, StudyInterrupted, case_study_config, run_case_study
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama3.1", corpus=[r["input"] for r in wtq_records(WTQ)[:10]])
    study = CaseStudy(base_model=str(base), wikitablequestions=str(WTQ), fourchan=str(POL),
                      work_dir=str(tmp_path / "study"), max_train_questions=8)
    study = study._replace(phase_one=case_study_config(study, 1)._replace(MAX_SEQ_LEN=256))
    stop = threading.Event()
    stop.set()
    with pytest.raises(StudyInterrupted, match="phase 1 stopped early .* resumes phase 1"):
        run_case_study(study, stop=stop)
    assert not (tmp_path / "study" / "phase1-merged").exists() and not (tmp_path / "study" / "phase2-checkpoints").exists()
