r"""Training data for the train job: read records, recognise their format, tokenize with the loss
on the response only, and hold out a validation split.

Sources: a JSONL file (plain path or `file://`), one S3 object (`s3://bucket/key.jsonl`) or a
Hugging Face dataset split (`hf://name[:config]/split`; a local dataset directory works too).
Every record of a dataset has the same format, recognised from its keys (first match wins):

| keys                           | prompt (no loss)                  | response (loss)         |
|--------------------------------|-----------------------------------|-------------------------|
| `messages`                     | chat template up to the last turn | last assistant turn     |
| `instruction`, `output`, input | the Alpaca template               | `output`                |
| `prompt`, `completion`         | `prompt`                          | `completion`            |
| `question`, `answer`           | `Question: {question}\nAnswer:`   | ` {answer}` (lm-eval)   |
| `code`                         | (none)                            | `code` (whole text)     |
| `text`                         | (none)                            | `text`                  |

The response always ends with the tokenizer's EOS, so the adapter learns to stop. Examples
longer than `max_seq_len` are an error, never truncated: a cut-off answer teaches the wrong thing.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.exceptions import ClientError

from loraforge.errors import LoraforgeError, PermanentError, TransientError
from loraforge.s3 import client_config, s3_errors
from loraforge.settings.train import TrainSettings
from loraforge.uri import parse_uri

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("loraforge.data")

IGNORE_INDEX = -100  # label value torch's cross-entropy (and HF models) skip
URI_FORMS = "a JSONL path, s3://bucket/key.jsonl or hf://dataset[:config]/split"
# The lm-eval gsm8k layout (`loraforge.tiny.qa_text`): train on the prompt the eval job asks.
QA_PROMPT = "Question: {question}\nAnswer:"
# Stanford Alpaca's templates, as axolotl and most instruction-tuned checkpoints use them.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One tokenized example: labels are `IGNORE_INDEX` on the prompt, the ids on the response."""

    input_ids: list[int]
    labels: list[int]


# --- reading ------------------------------------------------------------------------------------


def read_records(uri: str, *, variable: str = "LORAFORGE_DATA") -> list[dict[str, Any]]:
    """The records at `uri` (see the module docstring); `variable` names the setting in errors."""
    return read_located(uri, variable)[0]


def read_located(uri: str, variable: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Records plus where each came from (`data.jsonl:3`), for error messages downstream."""
    if uri.startswith("hf://"):
        records, locations = _read_hf(uri)
    else:
        raw = _read_s3_object(uri) if uri.startswith("s3://") else _read_local(uri, variable)
        records, locations = _parse_jsonl(raw, uri)
    if not records:
        raise PermanentError(
            f"{uri}: no records (empty, or only blank lines): point {variable} at data with "
            "one JSON object per line"
        )
    return records, locations


def _read_local(uri: str, variable: str) -> bytes:
    try:
        path = parse_uri(uri).path
    except ValueError as exc:
        # parse_uri's own hint lists artifact forms; data also comes from hf://
        raise PermanentError(f"{variable}={uri}: unsupported data URI: use {URI_FORMS}") from exc
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PermanentError(f"{uri}: file not found: fix {variable} ({URI_FORMS})") from exc
    except IsADirectoryError as exc:
        raise PermanentError(
            f"{uri}: is a directory: name a .jsonl file, or use hf://{path}/<split> to read it "
            "as a dataset directory"
        ) from exc
    except PermissionError as exc:
        raise PermanentError(f"{uri}: permission denied: make the file readable") from exc


def _read_s3_object(uri: str) -> bytes:
    """One object, read whole: the records are held in memory afterwards anyway."""
    try:
        location = parse_uri(uri)
    except ValueError as exc:
        raise PermanentError(f"{uri}: {exc}") from exc
    if not location.key:
        raise PermanentError(f"{uri}: name an object, as in s3://bucket/key.jsonl")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # a session of its own: boto3's default session caches credentials for the process
    client = boto3.session.Session().client("s3", region_name=region, config=client_config())
    with s3_errors(location):
        try:
            return bytes(client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise
            raise PermanentError(f"{uri}: no such object: check the key") from exc


def _parse_jsonl(raw: bytes, source: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One JSON object per line; blank lines skipped.

    Split on b"\\n" ourselves: str.splitlines would also break at U+2028 and friends, which are
    legal inside JSON strings.
    """
    records: list[dict[str, Any]] = []
    locations: list[str] = []
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        text = _decode_line(line, f"{source}:{number}").strip()
        if text:
            records.append(_parse_record(text, f"{source}:{number}"))
            locations.append(f"{source}:{number}")
    return records, locations


def _decode_line(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentError(
            f"{where}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}): "
            "save the file as UTF-8"
        ) from exc


def _parse_record(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PermanentError(
            f"{where}: not a JSON object ({exc.msg} at column {exc.colno}): "
            "write one JSON object per line"
        ) from exc
    if not isinstance(value, dict):
        raise PermanentError(
            f"{where}: not a JSON object (got a JSON {type(value).__name__}): "
            'write one object per line, e.g. {"prompt": ..., "completion": ...}'
        )
    return value


# --- Hugging Face datasets ----------------------------------------------------------------------


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """`hf://openai/gsm8k:main/train` -> ("openai/gsm8k", "main", "train"); the name may also be a
    local dataset directory (`hf:///abs/dir/train`, `hf://./rel/dir/train`)."""
    dataset, _, split = uri.removeprefix("hf://").rpartition("/")
    name, colon, config = dataset.rpartition(":")
    if not colon or "/" in config:  # no config: the ':' (if any) belongs to a path
        name, config = dataset, ""
    if not name or not split:
        raise PermanentError(
            f"{uri}: expected hf://dataset[:config]/split, e.g. hf://openai/gsm8k:main/train"
        )
    return name, config or None, split


def _read_hf(uri: str) -> tuple[list[dict[str, Any]], list[str]]:
    name, config, split = parse_hf_uri(uri)
    if name.startswith((".", "/", "~")):  # a local directory, never a hub id
        if not Path(name).expanduser().is_dir():
            raise PermanentError(f"{uri}: no dataset directory {name}: fix the path")
        name = str(Path(name).expanduser())
    # imported here: `datasets` takes seconds to import and only this source needs it
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split).to_list()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise _hub_error(uri, exc) from exc
    return list(rows), [f"{uri} record {i}" for i in range(1, len(rows) + 1)]


def _hub_error(uri: str, exc: Exception) -> LoraforgeError:
    """Not found, gated, bad split or config: permanent. The network or a 5xx: transient."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    response = getattr(exc, "response", None)
    status = int(getattr(response, "status_code", 0) or 0)
    if status in (401, 403):
        return PermanentError(f"{uri}: access refused ({detail}): set HF_TOKEN for gated datasets")
    # DatasetsError that is no OSError: the files are there but do not parse (generation error)
    if not isinstance(exc, OSError) or isinstance(exc, FileNotFoundError) or status in (400, 404):
        return PermanentError(f"{uri}: {detail}: check the dataset name, config and split")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return PermanentError(f"{uri}: not in the local cache and HF_HUB_OFFLINE is set ({detail})")
    return TransientError(f"{uri}: the Hugging Face Hub did not answer ({detail}): rerun later")


# --- formats ------------------------------------------------------------------------------------

Pair = tuple[str, str]  # (prompt, response) text
Render = Callable[[Mapping[str, Any], "PreTrainedTokenizerBase"], Pair]


def _alpaca(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> Pair:
    template = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT
    prompt = template.format(instruction=record["instruction"], input=record.get("input"))
    return prompt, record["output"]


def _prompt_completion(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> Pair:
    return record["prompt"], record["completion"]


def _question_answer(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> Pair:
    return QA_PROMPT.format(question=record["question"]), " " + record["answer"]


def _text(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> Pair:
    return "", record["text"]


def _code(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> Pair:
    """Code-only records (the BiDoRA seed's third format): the loss is on the whole source."""
    return "", record["code"]


def _chat(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> Pair:
    """Prompt: the template up to the last turn, with the assistant header. Response: the rest of
    the full rendering, i.e. the last assistant content plus the template's end of turn."""
    messages = record["messages"]
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not isinstance(prompt, str) or not isinstance(full, str) or not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render the conversation with its prompt as a prefix: "
            "convert the records to prompt/completion"
        )
    # the newline after the end-of-turn token separates turns; nothing follows the last one
    return prompt, full[len(prompt) :].rstrip()


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]  # keys with non-null values that identify the format
    response: str  # the key trained on
    render: Render
    optional: tuple[str, ...] = ()


FORMATS = (  # in detection order: Alpaca records often carry a `text` column too
    Format("messages", ("messages",), "messages", _chat),
    Format("instruction/input/output", ("instruction", "output"), "output", _alpaca, ("input",)),
    Format("prompt/completion", ("prompt", "completion"), "completion", _prompt_completion),
    Format("question/answer", ("question", "answer"), "answer", _question_answer),
    Format("code", ("code",), "code", _code),
    Format("text", ("text",), "text", _text),
)


def detect_format(record: Mapping[str, Any]) -> Format | None:
    """The first format whose keys the record has (null values count as absent: HF datasets
    fill missing columns with None)."""
    for fmt in FORMATS:
        if all(record.get(key) is not None for key in fmt.required):
            return fmt
    return None


def _dataset_format(records: Sequence[Mapping[str, Any]], locations: Sequence[str]) -> Format:
    """The first record's format; every other record must have the same keys."""
    fmt = detect_format(records[0])
    if fmt is None:
        known = "; ".join("/".join(f.required) for f in FORMATS)
        raise PermanentError(
            f"{locations[0]}: unknown record format (keys: {', '.join(sorted(records[0]))}): "
            f"use one of {known}"
        )
    for record, where in zip(records, locations, strict=True):
        missing = [key for key in fmt.required if record.get(key) is None]
        other = detect_format(record) if missing else None
        if other is not None:
            raise PermanentError(
                f"{where}: a {other.name} record in a {fmt.name} dataset (from {locations[0]}): "
                "use one format per dataset"
            )
        if missing:
            raise PermanentError(f"{where}: missing {', '.join(missing)} ({fmt.name} records)")
    return fmt


def _check_types(record: Mapping[str, Any], fmt: Format, where: str) -> None:
    """Strings where text is expected, and something to train on."""
    if fmt.name == "messages":
        _check_messages(record["messages"], where)
        return
    for key in fmt.required + fmt.optional:
        value = record.get(key)
        if (key in fmt.required or value is not None) and not isinstance(value, str):
            raise PermanentError(f"{where}: {key} must be a string, got {type(value).__name__}")
    if not record[fmt.response].strip():
        raise PermanentError(
            f"{where}: empty {fmt.response}, nothing to train on: fill it or drop it"
        )


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise PermanentError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for turn in messages:
        if not (
            isinstance(turn, dict)
            and isinstance(turn.get("role"), str)
            and isinstance(turn.get("content"), str)
        ):
            raise PermanentError(
                f'{where}: every message must be {{"role": str, "content": str}}, got {turn!r:.80}'
            )
    if messages[-1]["role"] != "assistant":
        raise PermanentError(
            f"{where}: the last message must be the assistant's (the turn trained on), "
            f"got {messages[-1]['role']!r}"
        )
    if not messages[-1]["content"].strip():
        raise PermanentError(f"{where}: the last assistant message is empty: fill it or drop it")


# --- tokenizing ---------------------------------------------------------------------------------


def tokenize(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    source: str,
    *,
    locations: Sequence[str] | None = None,
) -> list[Example]:
    """Prompt and response tokenized separately and concatenated, so the loss mask is exact.

    `locations` name each record in errors (`data.jsonl:3`); default `<source> record <n>`,
    1-based. Raises PermanentError on a bad record, an empty response or a too-long example.
    """
    if not records:
        raise PermanentError(f"{source}: no records")
    where = list(locations or [f"{source} record {i}" for i in range(1, len(records) + 1)])
    fmt = _dataset_format(records, where)
    pairs = [
        _render(fmt, record, tokenizer, loc) for record, loc in zip(records, where, strict=True)
    ]
    _check_characters(pairs, where, tokenizer, max_seq_len)
    prompts = _encode(tokenizer, [prompt for prompt, _ in pairs])
    responses = _encode(tokenizer, [response for _, response in pairs])
    bos, eos = _bos_prefix(tokenizer), _eos_id(tokenizer, source)
    examples = [
        _example(prompt, response, bos, eos, loc)
        for prompt, response, loc in zip(prompts, responses, where, strict=True)
    ]
    _check_lengths(examples, where, max_seq_len)
    log.info(
        "%s: %d examples, %s format, longest %d tokens",
        source,
        len(examples),
        fmt.name,
        max(len(e.input_ids) for e in examples),
    )
    return examples


def _render(
    fmt: Format, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, where: str
) -> Pair:
    _check_types(record, fmt, where)
    if fmt.name == "messages" and not getattr(tokenizer, "chat_template", None):
        raise PermanentError(
            f"{where}: messages records need a tokenizer with a chat template and this one has "
            "none: use a chat model, or convert the records to prompt/completion"
        )
    try:
        return fmt.render(record, tokenizer)
    except ValueError as exc:  # also jinja2's TemplateError raised by a chat template
        raise PermanentError(f"{where}: {exc}") from exc


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Batch-encode without special tokens: BOS and EOS are placed by `_example`."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos] when the tokenizer puts BOS first by default (Llama does, Qwen and GPT-2 do not):
    the model was pretrained that way and the eval prompt will be encoded that way."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    return [bos] if adds else []


def _eos_id(tokenizer: PreTrainedTokenizerBase, source: str) -> int:
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise PermanentError(
            f"{source}: the tokenizer has no EOS token, so the adapter could not learn to stop: "
            "use a base model whose tokenizer defines eos_token"
        )
    return eos


def _example(
    prompt: list[int], response: list[int], bos: list[int], eos: int, where: str
) -> Example:
    """BOS (unless a chat template already wrote it) + prompt, then response + EOS (unless the
    chat template's end of turn is the EOS token)."""
    if not response:
        raise PermanentError(f"{where}: empty response, nothing to train on: fill it in or drop it")
    head = [] if (prompt or response)[:1] == bos else bos
    tail = [] if response[-1] == eos else [eos]
    masked = head + prompt
    trained = response + tail
    return Example(masked + trained, [IGNORE_INDEX] * len(masked) + trained)


def _check_characters(
    pairs: Sequence[Pair],
    where: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
) -> None:
    """Refuse, before tokenizing, a record that cannot fit: n tokens spell at most n times the
    longest vocabulary entry's characters (x4 for normalizers that merge characters). Tokenizing
    a 16 MiB record took minutes and gigabytes before the length check could refuse it."""
    widest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    limit = 4 * (max_seq_len + 2) * widest
    for (prompt, response), loc in zip(pairs, where, strict=True):
        size = len(prompt) + len(response)
        if size > limit:
            raise PermanentError(
                f"{loc}: record is {size:,} characters, more than "
                f"LORAFORGE_MAX_SEQ_LEN={max_seq_len} tokens of this tokenizer can hold "
                f"({limit:,} at most): shorten or drop the record"
            )


def _check_lengths(examples: Sequence[Example], where: Sequence[str], max_seq_len: int) -> None:
    """One message for all too-long examples, with the length that would fit them all."""
    lengths = [(len(e.input_ids), loc) for e, loc in zip(examples, where, strict=True)]
    too_long = [(n, loc) for n, loc in lengths if n > max_seq_len]
    if not too_long:
        return
    (first, at), (longest, longest_at) = too_long[0], max(too_long)
    others = (
        f" ({len(too_long)} records are, the longest {longest} tokens at {longest_at})"
        if len(too_long) > 1
        else ""
    )
    raise PermanentError(
        f"{at}: example is {first} tokens, longer than LORAFORGE_MAX_SEQ_LEN={max_seq_len}"
        f"{others}: raise LORAFORGE_MAX_SEQ_LEN to {longest} or shorten the record"
        f"{'s' if others else ''}"
    )


# --- splits and the train job's entry point -----------------------------------------------------


def split_train_val(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out `round(n * val_fraction)` examples (at least 1 when the fraction is positive and
    n >= 2, never all), chosen by a shuffle seeded with `seed`; both keep the input order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    val = [e for i, e in enumerate(examples) if i in held_out]
    return train, val


def load_datasets(
    settings: TrainSettings, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Example], list[Example]]:
    """(train, val) for the train job: LORAFORGE_DATA, and LORAFORGE_VAL_DATA or a held-out
    LORAFORGE_VAL_FRACTION of the training data."""
    train = _load(settings.data, "LORAFORGE_DATA", tokenizer, settings.max_seq_len)
    if settings.val_data:
        val = _load(settings.val_data, "LORAFORGE_VAL_DATA", tokenizer, settings.max_seq_len)
    else:
        train, val = split_train_val(train, settings.val_fraction, settings.seed)
    log.info("data: %d training and %d validation examples", len(train), len(val))
    return train, val


def _load(
    uri: str, variable: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> list[Example]:
    records, locations = read_located(uri, variable)
    return tokenize(records, tokenizer, max_seq_len, uri, locations=locations)


__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Example",
    "Format",
    "detect_format",
    "load_datasets",
    "parse_hf_uri",
    "read_records",
    "split_train_val",
    "tokenize",
]
