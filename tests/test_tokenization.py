"""One tokenization for training, evaluation and serving: the prompt tokens jora trains on are exactly
`tokenizer(format_prompt(record))`, for a Llama-2-style SentencePiece tokenizer and a byte-level BPE one, both trained
in place; the answer tokens are what follows the prompt when both are tokenized as one string; context-first
truncation cuts on token boundaries of the whole prompt, so the cut prompt is what a server makes of its text."""
import pytest
from transformers import AutoTokenizer

from jora.data import TruncationReport, format_prompt, prompt_parts, tokenize_record
from jora.model import IGNORE_INDEX
from jora.testing import TINY_CORPUS, save_tiny_sentencepiece_tokenizer, save_tiny_tokenizer

CORPUS = TINY_CORPUS + [
    "Country: France. Capital: Paris. Population: 68 million.",
    "Zürich, São Paulo, Kraków, 東京 and Москва are cities; naïve café résumé.",
    "row 1: 2001 | 2 | USL A-League | 4th, Western\nrow 2: 2002 | 2 | USL A-League | 2nd, Pacific",
    "[1] opening post\n[2] >>1 a reply\n[3] the answer is [2]",
] * 3

RECORDS = [
    {"instruction": "Name the capital.", "input": "Country: France", "output": "Paris"},
    {"instruction": "Which city?", "input": "Zürich, São Paulo, Kraków, 東京 and Москва", "output": "Kraków"},
    {"instruction": "  Leading and trailing spaces.  ", "input": "  padded context  ", "output": "  spaced  "},
    {"instruction": "Read the table.", "input": "row 1: 2001 | 2 | USL\nrow 2: 2002 | 2 | USL\n\nrow 3: 2003",
     "output": "2002"},
    {"instruction": "Which post does post [3] reply to?", "input": "[1] opening post\n[2] >>1 a reply",
     "output": " [2]"},
    {"instruction": "How many?", "input": "Population: 68 million.", "output": "68 million"},
    {"instruction": "No context here.", "input": "", "output": "A plain answer."},
]


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level"])
def tokenizer(request, tmp_path_factory):
    save = save_tiny_sentencepiece_tokenizer if request.param == "sentencepiece" else save_tiny_tokenizer
    return AutoTokenizer.from_pretrained(save(tmp_path_factory.mktemp(request.param), vocab_size=700, corpus=CORPUS))


def prompt_and_answer(example):
    labelled = example["labels"] != IGNORE_INDEX
    return [int(t) for t in example["input_ids"][~labelled]], [int(t) for t in example["input_ids"][labelled]]


@pytest.mark.parametrize("record", RECORDS, ids=range(len(RECORDS)))
def test_prompt_tokens_are_the_tokenizers_own(tokenizer, record):
    prompt, answer = prompt_and_answer(tokenize_record(record, tokenizer, max_len=4096))
    assert prompt == list(tokenizer(format_prompt(record))["input_ids"])  # BOS included, by the tokenizer's rule
    assert prompt[0] == tokenizer.bos_token_id and answer[-1] == tokenizer.eos_token_id
    # the answer, read after its prompt as a server streams it, is the output
    shown = tokenizer.decode(prompt + answer[:-1], skip_special_tokens=True)
    assert shown == tokenizer.decode(prompt, skip_special_tokens=True) + record["output"]


@pytest.mark.parametrize("record", RECORDS[:6], ids=range(6))
@pytest.mark.parametrize("max_len", [40, 57, 64])
def test_a_cut_prompt_is_what_a_server_makes_of_its_text(tokenizer, record, max_len):
    long_record = {**record, "input": "\n".join([record["input"]] * 12)}
    report = TruncationReport()
    example = tokenize_record(long_record, tokenizer, max_len=max_len, report=report)
    if example is None:
        assert report.left_out == [None]
        return
    prompt, answer = prompt_and_answer(example)
    text = tokenizer.decode(prompt, skip_special_tokens=True)
    assert list(tokenizer(text)["input_ids"]) == prompt and len(prompt) + len(answer) <= max_len
    before, context, after = prompt_parts(long_record)
    assert text.endswith(after) and text.startswith(before.rstrip())
    kept = text[len(before):len(text) - len(after)]
    assert long_record["input"].startswith(kept)  # the context's beginning, cut at its end
    if report.context_truncated:  # a full answer, and the prompt as long as the room allows, give or take the seam
        assert answer[-1] == tokenizer.eos_token_id and len(prompt) + len(answer) >= max_len - 2


def test_the_old_piecewise_encoding_differs_for_sentencepiece(tmp_path):
    "What the single-string rule fixes: encoding the pieces apart puts a word-start marker where a server has none."
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_sentencepiece_tokenizer(tmp_path, 700, CORPUS))
    record = RECORDS[0]
    pieces = [tokenizer.bos_token_id] + [t for part in prompt_parts(record) if part
                                         for t in tokenizer(part, add_special_tokens=False)["input_ids"]]
    prompt, _ = prompt_and_answer(tokenize_record(record, tokenizer, max_len=512))
    assert pieces != prompt == list(tokenizer(format_prompt(record))["input_ids"])
    assert tokenizer.decode(prompt, skip_special_tokens=True) == format_prompt(record)
    old_text = tokenizer.decode(pieces, skip_special_tokens=True)  # a server never sees these spaces
    assert old_text != format_prompt(record) and ":\n Country: France \n\n### Response:" in old_text


def test_a_merge_across_the_join_keeps_the_prompt_exact_and_is_counted(tmp_path):
    "A byte-level tokenizer that learnt ':[' as one token: the prompt ends in ':', the answer starts with '['."
    corpus = ["Response:[1] Response:[2] Response:[3]"] * 50 + CORPUS
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path, 700, corpus))
    assert len(tokenizer(":[", add_special_tokens=False)["input_ids"]) == 1
    record = {"instruction": "Which post?", "input": "[1] a\n[2] b", "output": "[2]"}
    report = TruncationReport()
    prompt, answer = prompt_and_answer(tokenize_record(record, tokenizer, max_len=512, report=report))
    assert prompt == list(tokenizer(format_prompt(record))["input_ids"]) and report.answers_encoded_alone == 1
    assert tokenizer.decode(answer) == "[2]" + tokenizer.eos_token
    assert "1 outputs encoded apart from their prompt" in str(report)


def test_a_tokenizer_without_offsets_is_a_clear_error():
    class NoOffsets:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
            if return_offsets_mapping:
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return {"input_ids": [1] + [3] * len(text)}

    with pytest.raises(ValueError, match="NoOffsets gives no character offsets.*fast tokenizer"):
        tokenize_record(RECORDS[0], NoOffsets(), max_len=64)
