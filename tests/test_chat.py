"""Chat records: `{"messages": [...], "context": ...}` written by the tokenizer's own chat template, tokenized as a chat
server tokenizes them, the loss on the assistant turns (all, or the last), the context cut first; checked against
transformers' own `apply_chat_template` (its tokens and its assistant-token mask), for a SentencePiece tokenizer with
a Llama-2-style template and a byte-level one with a header-style template, both built in place."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from jora.data import (AlpacaDataset, RecordError, TruncationReport, as_chat, generate_alpaca_dataset, prompt_ids,
                       read_records, tokenize_chat_record)
from jora.model import IGNORE_INDEX
from jora.testing import (TINY_CORPUS, add_chat_template, demo_raft_records, save_tiny_sentencepiece_tokenizer,
                          save_tiny_tokenizer)

CONVERSATION = {
    "messages": [{"role": "system", "content": "Answer from the table."},
                 {"role": "user", "content": "Which capital has Kraków's country?"},
                 {"role": "assistant", "content": "Warsaw"},
                 {"role": "user", "content": "And the population, in millions?"},
                 {"role": "assistant", "content": " 38 million"}],
    "context": "Poland | Warsaw | 38\nPeru | Lima | 34\nZürich is in Switzerland.\n" * 4,
}


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level"])
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save = save_tiny_sentencepiece_tokenizer if request.param == "sentencepiece" else save_tiny_tokenizer
    save(folder, vocab_size=700, corpus=TINY_CORPUS + [CONVERSATION["context"], "[INST] <<SYS>> [/INST]"] * 3)
    add_chat_template(folder, "llama2" if request.param == "sentencepiece" else "header")
    return AutoTokenizer.from_pretrained(folder)


def rendered_messages(record):
    messages = [dict(m) for m in record["messages"]]
    messages[1]["content"] = record["context"] + "\n\n" + messages[1]["content"]
    return messages


def test_tokens_and_assistant_mask_are_transformers_own(tokenizer):
    record = read_records([CONVERSATION])[0]
    example = tokenize_chat_record(record, tokenizer, max_len=4096)
    reference = tokenizer.apply_chat_template(rendered_messages(record), tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert example["input_ids"].tolist() == list(reference["input_ids"])
    assert ((example["labels"] != IGNORE_INDEX).astype(int).tolist() == list(reference["assistant_masks"]))
    labelled = example["labels"][example["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(labelled, skip_special_tokens=True).replace(" ", "") == "Warsaw38million"
    last = tokenize_chat_record(record, tokenizer, max_len=4096, assistant_turns="last")
    assert tokenizer.decode(last["labels"][last["labels"] != IGNORE_INDEX], skip_special_tokens=True).strip() == "38 million"


def test_the_context_is_cut_first_and_the_result_is_what_a_server_renders(tokenizer):
    record = read_records([CONVERSATION])[0]
    whole = tokenize_chat_record(record, tokenizer, max_len=4096)
    for max_len in (len(whole["input_ids"]) - 7, len(whole["input_ids"]) - 30):
        report = TruncationReport()
        cut = tokenize_chat_record(record, tokenizer, max_len=max_len, report=report)
        assert report.context_truncated == 1 and len(cut["input_ids"]) <= max_len
        np.testing.assert_array_equal(cut["labels"][cut["labels"] != IGNORE_INDEX],
                                      whole["labels"][whole["labels"] != IGNORE_INDEX])  # every answer kept
        served = lambda kept: list(tokenizer.apply_chat_template(rendered_messages({**record, "context": kept}),
                                                                   tokenize=True)["input_ids"])
        # what a server renders for the conversation with the context's first k characters, for some k
        assert any(cut["input_ids"].tolist() == served(record["context"][:k]) for k in range(len(record["context"])))


def test_prompt_ids_are_the_generation_prompt_before_the_last_answer(tokenizer):
    record = read_records([CONVERSATION])[0]
    messages = rendered_messages(record)[:-1]
    served = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert prompt_ids(record, tokenizer) == list(served)


def test_bad_chat_records_are_named(tmp_path, tokenizer):
    no_answer = {"messages": [{"role": "user", "content": "Hi"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(CONVERSATION) + "\n" + json.dumps(no_answer) + "\n")
    with pytest.raises(RecordError, match=r"chat.jsonl, record 2 \(line 2\): no assistant turn"):
        read_records(tmp_path / "chat.jsonl")
    with pytest.raises(RecordError, match=r"record 1, message 1: expected \{'role'"):
        read_records([{"messages": [{"role": "bot", "content": "x"}]}])
    (tmp_path / "mixed.jsonl").write_text(json.dumps(demo_raft_records(1)[0]) + "\n" + json.dumps(CONVERSATION) + "\n")
    plain = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "plain"))
    with pytest.raises(RecordError, match=r"mixed.jsonl, record 2: a chat record, but the tokenizer has no chat template"):
        AlpacaDataset(path=tmp_path / "mixed.jsonl", split="train", split_percentage=1.0, tokenizer=plain, alpaca_mix=0)


def test_chat_records_train_through_the_papers_entry_point(tmp_path):
    from jora.config import ParallamaConfig
    from jora.testing import save_tiny_hf_checkpoint
    from jora.train import train_lora
    records = [as_chat(r, system="Answer from the table.") for r in demo_raft_records(24)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    model = save_tiny_hf_checkpoint(tmp_path / "tiny", "llama3.1", corpus=[r["context"] for r in records])
    tokenizer = AutoTokenizer.from_pretrained(add_chat_template(model))
    config = ParallamaConfig(LLAMA2_HF_PATH=str(model), LORA_R=4, LORA_ALPHA=8, DTYPE="float32", REMAT="none",
                             BATCH_SIZE=4, N_ACCUMULATION_STEPS=1, MAX_SEQ_LEN=192, NUM_GPUS=1, MAX_STEPS=2,
                             CHAT_LOSS="last")
    dataset = generate_alpaca_dataset(tmp_path / "chat.jsonl", "train", config)
    first = dataset[0]
    answer = tokenizer.decode(first["labels"][first["labels"] != IGNORE_INDEX], skip_special_tokens=True)
    assert answer == dataset.records[0]["messages"][-1]["content"]
    result = train_lora(config, dataset, tmp_path / "run", progress=False)
    assert len(result.history) == 2 and all(np.isfinite(r["loss"]) for r in result.history)
