"""Training data: sources, format detection, loss masks, errors and the validation split, with
the tiny kit's real tokenizer (byte-level BPE, `<s>`/`</s>`, ChatML template, no BOS added)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from loraforge.data import (
    IGNORE_INDEX,
    Example,
    detect_format,
    load_datasets,
    parse_hf_uri,
    read_records,
    split_train_val,
    tokenize,
)
from loraforge.errors import PermanentError
from loraforge.settings.train import TrainSettings
from loraforge.tiny import addition_splits, build_tokenizer, qa_text

EOS = "</s>"
GSM8K = {"question": "Tom has 12 apples and buys 3 more.", "answer": "12 + 3 = 15.\n#### 15"}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer made to put `<s>` first, as Llama's does, and a template that writes
    `<s>` itself, as Llama 3's does."""
    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    return tok


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def parts(example: Example, tok: PreTrainedTokenizerFast) -> tuple[str, str]:
    """(decoded masked tokens, decoded label tokens)."""
    masked = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label < 0]
    trained = [label for label in example.labels if label != IGNORE_INDEX]
    return tok.decode(masked), tok.decode(trained)


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
)
FORMAT_CASES = [
    pytest.param(
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        "instruction/input/output",
        ALPACA_WITH_INPUT,
        "5",
        id="alpaca-input",
    ),
    pytest.param(
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "text": "ignored"},
        "instruction/input/output",
        ALPACA_NO_INPUT,
        "Hi!",
        id="alpaca-no-input",
    ),
    pytest.param(
        {"prompt": "The capital of France is", "completion": " Paris."},
        "prompt/completion",
        "The capital of France is",
        " Paris.",
        id="prompt-completion",
    ),
    pytest.param(
        GSM8K,
        "question/answer",
        "Question: Tom has 12 apples and buys 3 more.\nAnswer:",
        " 12 + 3 = 15.\n#### 15",
        id="question-answer",
    ),
    pytest.param(
        {"messages": CHAT},
        "messages",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n",
        "Hello!<|im_end|>",
        id="messages",
    ),
    pytest.param({"text": "Mia has 40 shells."}, "text", "", "Mia has 40 shells.", id="text"),
]


@pytest.mark.parametrize(("record", "name", "prompt", "response"), FORMAT_CASES)
def test_each_format_masks_exactly_the_prompt(
    tokenizer: PreTrainedTokenizerFast,
    record: dict[str, Any],
    name: str,
    prompt: str,
    response: str,
) -> None:
    fmt = detect_format(record)
    assert fmt is not None and fmt.name == name
    [example] = tokenize([record], tokenizer, 512, "data.jsonl")
    assert parts(example, tokenizer) == (prompt, response + EOS)
    # prompt and response are tokenized apart and concatenated: the boundary is where the mask ends
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [
        tokenizer.eos_token_id
    ]


def test_question_answer_trains_on_the_eval_prompt_layout(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    [example] = tokenize([GSM8K], tokenizer, 512, "data.jsonl")
    assert tokenizer.decode(example.input_ids) == qa_text(GSM8K) + EOS
    prompt, _ = parts(example, tokenizer)
    assert prompt == "Question: Tom has 12 apples and buys 3 more.\nAnswer:"


def test_bos_is_added_once_when_the_tokenizer_adds_it(
    bos_tokenizer: PreTrainedTokenizerFast,
) -> None:
    bos = bos_tokenizer.bos_token_id
    qa, chat = tokenize([GSM8K], bos_tokenizer, 512, "d") + tokenize(
        [{"messages": CHAT}], bos_tokenizer, 512, "d"
    )
    for example in (qa, chat):  # chat: the template wrote <s>, so it is not added again
        assert example.input_ids[0] == bos and example.input_ids.count(bos) == 1
        assert example.labels[0] == IGNORE_INDEX
    prompt = "<s>Question: Tom has 12 apples and buys 3 more.\nAnswer:"
    assert parts(qa, bos_tokenizer) == (prompt, " 12 + 3 = 15.\n#### 15" + EOS)
    assert parts(chat, bos_tokenizer)[1] == "Hello!<|im_end|>" + EOS


def test_jsonl_blank_lines_are_skipped_and_records_read(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n  \n{"text": "b"}\r\n', encoding="utf-8")
    assert read_records(str(path)) == [{"text": "a"}, {"text": "b"}]
    assert read_records(path.as_uri()) == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("[1, 2]", r"data\.jsonl:3: not a JSON object \(got a JSON list\)"),
        ('{"text": "a"', r"data\.jsonl:3: not a JSON object \(Expecting ',' delimiter"),
    ],
)
def test_malformed_line_is_named_by_number(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PermanentError, match=match):
        read_records(str(path))


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(PermanentError, match=r"data\.jsonl: no records .* LORAFORGE_DATA"):
        read_records(str(path))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(
        PermanentError, match=r"nope\.jsonl: file not found: fix LORAFORGE_VAL_DATA"
    ):
        read_records(str(tmp_path / "nope.jsonl"), variable="LORAFORGE_VAL_DATA")
    with pytest.raises(PermanentError, match=r"LORAFORGE_DATA=gs://b/k: unsupported data URI"):
        read_records("gs://b/k")


def test_invalid_utf8_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        PermanentError, match=r"data\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"
    ):
        read_records(str(path))


def test_too_long_example_names_record_length_and_fix(tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [
        {"text": "Hi."},
        {"text": "Tom has 12 apples."},
        {"text": "Ana has 40 coins and 3 cards."},
    ]
    lengths = [len(e.input_ids) for e in tokenize(rows, tokenizer, 512, "d")]
    assert lengths[0] <= 6 < lengths[1] < lengths[2]
    where = ["data.jsonl:1", "data.jsonl:2", "data.jsonl:4"]
    with pytest.raises(PermanentError) as info:
        tokenize(rows[:2], tokenizer, 6, "d", locations=where[:2])
    assert str(info.value) == (
        f"data.jsonl:2: example is {lengths[1]} tokens, longer than LORAFORGE_MAX_SEQ_LEN=6: "
        f"raise LORAFORGE_MAX_SEQ_LEN to {lengths[1]} or shorten the record"
    )
    with pytest.raises(PermanentError) as info:
        tokenize(rows, tokenizer, 6, "d", locations=where)
    assert str(info.value) == (
        f"data.jsonl:2: example is {lengths[1]} tokens, longer than LORAFORGE_MAX_SEQ_LEN=6 "
        f"(2 records are, the longest {lengths[2]} tokens at data.jsonl:4): "
        f"raise LORAFORGE_MAX_SEQ_LEN to {lengths[2]} or shorten the records"
    )


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([GSM8K, {"text": "x"}], r"data\.jsonl:2: a text record in a question/answer dataset"),
        ([GSM8K, {"question": "q"}], r"data\.jsonl:2: missing answer \(question/answer records\)"),
        ([{"title": "t"}], r"data\.jsonl:1: unknown record format \(keys: title\)"),
        ([{"prompt": "p", "completion": ""}], r"data\.jsonl:1: empty completion"),
        ([{"question": "q", "answer": 42}], r"data\.jsonl:1: answer must be a string, got int"),
        ([{"messages": CHAT[:2]}], r"data\.jsonl:1: the last message must be the assistant's"),
    ],
    ids=["mixed", "missing-key", "unknown", "empty-response", "not-string", "chat-ends-user"],
)
def test_bad_records_are_named_by_line(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, rows: list[Any], match: str
) -> None:
    settings = TrainSettings(base_model="m", data=str(write_jsonl(tmp_path / "data.jsonl", rows)))
    with pytest.raises(PermanentError, match=match):
        load_datasets(settings, tokenizer)


def test_messages_need_a_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(PermanentError, match=r"d record 1: messages records need .* chat template"):
        tokenize([{"messages": CHAT}], plain, 512, "d")


def test_split_is_deterministic_disjoint_and_complete() -> None:
    examples = [Example([i], [i]) for i in range(20)]
    train, val = split_train_val(examples, 0.25, seed=7)
    assert (train, val) == split_train_val(examples, 0.25, seed=7)
    assert val != split_train_val(examples, 0.25, seed=8)[1]
    assert len(val) == 5 and len(train) == 15
    ids = [e.input_ids[0] for e in train + val]
    assert sorted(ids) == list(range(20))
    assert split_train_val(examples, 0.0, seed=7) == (examples, [])
    assert [len(part) for part in split_train_val(examples[:2], 0.01, seed=0)] == [1, 1]
    assert split_train_val(examples[:1], 0.5, seed=0) == (examples[:1], [])


def test_load_datasets_splits_or_reads_val_data(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    train_rows, val_rows = addition_splits(0, (40, 6))
    train_path = write_jsonl(tmp_path / "train.jsonl", train_rows)
    held_out = TrainSettings(base_model="m", data=str(train_path), val_fraction=0.1, seed=1)
    train, val = load_datasets(held_out, tokenizer)
    assert (len(train), len(val)) == (36, 4)
    assert train[0] == tokenize(train_rows[:1], tokenizer, 512, "x")[0]
    val_path = write_jsonl(tmp_path / "val.jsonl", val_rows)
    explicit = held_out.model_copy(update={"val_data": str(val_path)})
    train, val = load_datasets(explicit, tokenizer)
    assert (len(train), len(val)) == (40, 6)
    assert val == tokenize(val_rows, tokenizer, 512, "x")


def test_parse_hf_uri() -> None:
    assert parse_hf_uri("hf://openai/gsm8k:main/train") == ("openai/gsm8k", "main", "train")
    assert parse_hf_uri("hf://stanfordnlp/imdb/test") == ("stanfordnlp/imdb", None, "test")
    # a ':' names a config only in the last segment of the dataset part
    assert parse_hf_uri("hf:///data/dir:cfg/train") == ("/data/dir", "cfg", "train")
    assert parse_hf_uri("hf:///data/v1:2/dir/train") == ("/data/v1:2/dir", None, "train")
    with pytest.raises(PermanentError, match=r"expected hf://dataset\[:config\]/split"):
        parse_hf_uri("hf://gsm8k")


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, also for modules that read it at import (huggingface_hub, datasets)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.mark.usefixtures("hf_offline")
def test_hf_local_dataset_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_rows, test_rows = addition_splits(0, (5, 3))
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "ds" / "test.jsonl", test_rows)
    assert read_records(f"hf://{tmp_path}/ds/train") == train_rows
    monkeypatch.chdir(tmp_path)
    assert read_records("hf://./ds/test") == test_rows
    with pytest.raises(PermanentError, match=r"hf://./ds/validation: Unknown split"):
        read_records("hf://./ds/validation")
    with pytest.raises(PermanentError, match=r"no dataset directory ./missing"):
        read_records("hf://./missing/train")


@pytest.mark.usefixtures("hf_offline")
def test_hf_hub_dataset_offline_is_permanent() -> None:
    with pytest.raises(PermanentError, match=r"openai/gsm8k:main/train: not in the local cache"):
        read_records("hf://openai/gsm8k:main/train")


@pytest.mark.s3
def test_s3_object(s3_bucket: str) -> None:
    import boto3

    rows = [GSM8K, {"question": "Ana has 20 coins.", "answer": "#### 20"}]
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    client = boto3.session.Session().client("s3")
    client.put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="data/train.jsonl", Body=body)
    assert read_records(f"{s3_bucket}/data/train.jsonl") == rows
    with pytest.raises(PermanentError, match=r"/data/nope\.jsonl: no such object"):
        read_records(f"{s3_bucket}/data/nope.jsonl")
    with pytest.raises(PermanentError, match=r"bucket .* does not exist"):
        read_records(f"s3://missing-{uuid.uuid4().hex[:8]}/train.jsonl")
