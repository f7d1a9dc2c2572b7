"""How much jora's old tokenization (instruction, context and suffix encoded apart, the output apart) differs from the
one-string tokenization a server uses, on the case study's data: the WikiTableQuestions training split (the first
`--wtq` questions, whole tables) and the 4chan sample's directionality examples (both splits). Tokenizers are trained
in place on the same data (no download): a Llama-2-style SentencePiece BPE and a byte-level BPE, `--vocab` pieces.

    python tools/tokenization_drift.py [--data ../shared/data] [--wtq 1000] [--vocab 8000]

The old encoding is written out here (not in the package) only to be measured against.
"""
import argparse
import difflib
import statistics
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from jora.data import format_prompt, prompt_parts, tokenize_record
from jora.model import IGNORE_INDEX
from jora.raft import fourchan_records, wtq_records
from jora.testing import save_tiny_sentencepiece_tokenizer, save_tiny_tokenizer


def old_tokens(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    "Prompt and answer tokens as jora made them before: BOS, each piece encoded on its own, then output and EOS."
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    prompt = [tokenizer.bos_token_id] + [t for part in prompt_parts(record) for t in encode(part)]
    return prompt, encode(record["output"]) + [tokenizer.eos_token_id]


def new_tokens(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    example = tokenize_record(record, tokenizer, max_len=1 << 30)
    labelled = example["labels"] != IGNORE_INDEX
    return example["input_ids"][~labelled].tolist(), example["input_ids"][labelled].tolist()


def changed_tokens(old: list[int], new: list[int]) -> int:
    "Tokens of the new sequence outside the blocks it shares with the old one."
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    return len(new) - sum(block.size for block in matcher.get_matching_blocks())


def measure(records: list[dict], tokenizer) -> dict:
    prompts_differ, answers_differ, changed, lengths = 0, 0, [], []
    for record in records:
        (old_prompt, old_answer), (new_prompt, new_answer) = old_tokens(record, tokenizer), new_tokens(record, tokenizer)
        lengths.append(len(new_prompt))
        if old_prompt != new_prompt:
            prompts_differ += 1
            changed.append(changed_tokens(old_prompt, new_prompt))
        answers_differ += old_answer != new_answer
    return {"records": len(records), "prompts differ": f"{prompts_differ / len(records):.1%}",
            "answers differ": f"{answers_differ / len(records):.1%}",
            "changed tokens per affected prompt (median, max)": (statistics.median(changed), max(changed)) if changed else (0, 0),
            "prompt tokens (median)": statistics.median(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--wtq", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=8000)
    arguments = parser.parse_args()
    data = Path(arguments.data)
    wtq = wtq_records(data / "wikitablequestions-train")[:arguments.wtq]
    chan = [r for split in ("train", "test") for r in fourchan_records(data / "4chan-sample" / "pol_sample.ndjson", split)]
    corpus = [format_prompt(r) + r["output"] for r in wtq + chan]
    folder = Path(tempfile.mkdtemp(prefix="jora-drift-"))
    for kind, save in (("SentencePiece (Llama 2 style)", save_tiny_sentencepiece_tokenizer),
                       ("byte-level BPE", save_tiny_tokenizer)):
        tokenizer = AutoTokenizer.from_pretrained(save(folder / kind.split()[0], vocab_size=arguments.vocab, corpus=corpus))
        for name, records in (("WikiTableQuestions", wtq), ("4chan directionality", chan)):
            print(f"{kind:30s} {name:22s} {measure(records, tokenizer)}")


if __name__ == "__main__":
    main()
