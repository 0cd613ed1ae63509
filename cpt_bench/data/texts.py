"""Reading a suite's data: corpora and end-task splits (files or hub datasets), checked row by row, and the
encoding of end-task splits for fine-tuning. (MLM blocks and masking: `cpt_bench.data.batches`.)"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.data.corpus import Corpus, field_text, file_records
from cpt_bench.data.suite import EndTask, HubSource, Source

# ---------------------------------------------------------------- reading records

def resolve_path(source: str, data_dir: Path | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute():
        if data_dir is None:
            raise BadInput(f"data file {source!r} is relative but the suite has no data dir (use --data-dir)")
        path = data_dir / path
    return path


def read_file_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl (one object a line), .txt (one text a line, field `text`) or .csv (header) file."""
    check_file(path)
    return list(file_records(path))


def check_file(path: Path) -> None:
    if not path.is_file():
        if not path.parent.is_dir():  # name the folder: a whole domain is usually what is missing
            raise BadInput(f"missing data folder: {path.parent} (needed for {path.name})")
        raise BadInput(f"missing data file: {path}")


def load_hub_dataset(source: HubSource):
    """A hub dataset's split as `datasets` keeps it: an Arrow table memory-mapped from its cache, not rows in
    memory."""
    import datasets

    try:
        return datasets.load_dataset(source.hub, source.config, split=source.split)
    except Exception as error:  # noqa: BLE001  (the hub raises many types; all mean "cannot load this id here")
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "not in the local cache and the hub is offline" if offline else type(error).__name__
        raise BadInput(f"cannot load hub dataset {source.hub!r} ({why})") from None


def hub_name(source: HubSource) -> str:
    return f"hub:{source.hub}/{source.config}/{source.split}"


def read_hub_records(source: HubSource) -> tuple[list[dict[str, Any]], str]:
    dataset = load_hub_dataset(source)
    return [{**row, "_line": i + 1} for i, row in enumerate(dataset)], hub_name(source)


def read_records(source: Source, data_dir: Path | None) -> tuple[list[dict[str, Any]], str]:
    """Rows of a source and a name for messages (file path or hub id)."""
    if isinstance(source, HubSource):
        return read_hub_records(source)
    path = resolve_path(source, data_dir)
    return read_file_records(path), str(path)


def read_corpus(source: Source, field: str, data_dir: Path | None, limit: int | None) -> tuple[Corpus, str]:
    """A corpus's non-empty texts (the first `limit`) as a `Corpus`: read again on each pass, never whole into
    memory; one pass now counts them (and finds a malformed line or a missing field before any training)."""
    if isinstance(source, HubSource):
        dataset = load_hub_dataset(source)
        where = hub_name(source)

        def records():
            return ({**row, "_line": i + 1} for i, row in enumerate(dataset))
    else:
        path = resolve_path(source, data_dir)
        check_file(path)
        where = str(path)

        def records():
            return file_records(path)
    corpus = Corpus(records, field, where, limit)
    if not len(corpus):
        raise BadInput(f"empty corpus: {where}")
    return corpus, where


# ---------------------------------------------------------------- end tasks

@dataclasses.dataclass
class EndTaskSplit:
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int]
    source: str


@dataclasses.dataclass
class EndTaskData:
    name: str
    label_names: list[str]
    train: EndTaskSplit
    test: EndTaskSplit
    dev: EndTaskSplit | None
    average: str
    finetune_overrides: dict[str, Any]
    evaluator: str = "head"
    template: str | None = None
    verbalizer: dict[str, list[str]] | None = None
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # examples used per split (after sampling)
    dev_split: str = ""  # where the dev split came from, in words (for the result file)


def read_end_task_split(source: Source, task: EndTask, data_dir: Path | None, limit: int | None,
                        what: str) -> EndTaskSplit:
    rows, where = read_records(source, data_dir)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise BadInput(f"empty {what} split: {where}")
    label_index = {label: i for i, label in enumerate(task.labels)}
    texts, pairs, labels = [], [], []
    for row in rows:
        texts.append(field_text(row, task.text_field, where))
        if task.text_pair_field:
            pairs.append(field_text(row, task.text_pair_field, where))
        if task.label_field not in row:
            raise BadInput(f"{where} line {row['_line']}: missing field {task.label_field!r}")
        label = str(row[task.label_field])
        if label not in label_index:
            raise BadInput(f"{where} line {row['_line']}: label {label!r} is not in the label set "
                           f"{task.labels}")
        labels.append(label_index[label])
    return EndTaskSplit(texts, pairs if task.text_pair_field else None, labels, where)


def read_verbalizer(task: EndTask, data_dir: Path | None, name: str) -> dict[str, list[str]]:
    verbalizer = task.prompt.verbalizer
    where = f"end task {name} verbalizer"
    if isinstance(verbalizer, str):
        path = resolve_path(verbalizer, data_dir)
        where = str(path)
        if not path.is_file():
            raise BadInput(f"missing data file: {path}")
        try:
            verbalizer = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadInput(f"{path}: not a JSON object of label -> list of words") from None
    if not isinstance(verbalizer, dict) or sorted(verbalizer) != sorted(task.labels) or not all(
            isinstance(words, list) and words and all(isinstance(w, str) for w in words)
            for words in verbalizer.values()):
        raise BadInput(f"{where}: needs a non-empty list of words for every label of {task.labels} and nothing else")
    return {label: list(verbalizer[label]) for label in task.labels}


def stratified_sample(labels: list[int], size: int, seed: int) -> list[int]:
    """The (sorted) indices of a sample of `size` examples whose label counts follow the split's: every class
    gets at least one example (up to `size` classes), the rest is shared in proportion by largest remainder,
    and which examples of a class are drawn depends only on `seed`. A split no larger than `size` is kept whole."""
    if size >= len(labels):
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    classes = sorted(by_class, key=lambda c: (-len(by_class[c]), c))  # the largest classes first
    quota = {c: 1 if rank < size else 0 for rank, c in enumerate(classes)}
    left = size - sum(quota.values())
    room = {c: len(by_class[c]) - quota[c] for c in classes}
    share = {c: left * room[c] / max(1, sum(room.values())) for c in classes}
    for c in classes:
        quota[c] += int(share[c])
    by_remainder = sorted(classes, key=lambda c: (-(share[c] - int(share[c])), classes.index(c)))
    for c in by_remainder[: size - sum(quota.values())]:
        quota[c] += 1
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in sorted(by_class):
        order = torch.randperm(len(by_class[c]), generator=generator)[: quota[c]]
        chosen.extend(by_class[c][i] for i in order.tolist())
    return sorted(chosen)


def split_rows(split: EndTaskSplit, rows: list[int]) -> EndTaskSplit:
    """The given rows of a split (in the order given)."""
    return EndTaskSplit([split.texts[i] for i in rows], split.text_pairs and [split.text_pairs[i] for i in rows],
                        [split.labels[i] for i in rows], split.source)


def read_end_task(name: str, task: EndTask, data_dir: Path | None, limit: int | None) -> EndTaskData:
    prompt = task.prompt if task.evaluator == "prompt" else None
    dev_source = task.dev
    if task.dev_optional and isinstance(dev_source, str) and not resolve_path(dev_source, data_dir).exists():
        dev_source = None  # e.g. SemEval-14 restaurant ships no dev split: no model selection for it, unless ...
    train = read_end_task_split(task.train, task, data_dir, limit, f"{name} train")
    test = read_end_task_split(task.test, task, data_dir, limit, f"{name} test")
    dev = read_end_task_split(dev_source, task, data_dir, limit, f"{name} dev") if dev_source else None
    dev_split = f"file {dev.source}" if dev is not None else "none"
    if dev is None and task.dev_from_train:  # ... the suite carves a dev split out of train
        dev, train, dev_split = dev_from_train(train, task)
    splits = {"train": train, "dev": dev, "test": test}
    for which, size in task.subsample.items():
        if splits[which] is not None:  # a split smaller than its size is used whole (its size is recorded)
            splits[which] = split_rows(splits[which], stratified_sample(splits[which].labels, size, task.sample_seed))
    return EndTaskData(
        name=name,
        label_names=list(task.labels),
        train=splits["train"],
        test=splits["test"],
        dev=splits["dev"],
        average=task.average,
        finetune_overrides=dict(task.finetune),
        evaluator=task.evaluator,
        template=prompt.template if prompt else None,
        verbalizer=read_verbalizer(task, data_dir, name) if prompt else None,
        sizes={which: len(split.labels) for which, split in splits.items() if split is not None},
        dev_split=dev_split,
    )


def dev_from_train(train: EndTaskSplit, task: EndTask) -> tuple[EndTaskSplit | None, EndTaskSplit, str]:
    """(dev, train, how) for a task without a dev split: a stratified sample of at most `dev_from_train` and at
    most `dev_from_train_fraction` of train, drawn from the classes with two or more examples (a class seen once
    keeps its example for training); no dev split when train is too small to give one."""
    wanted = min(task.dev_from_train, int(task.dev_from_train_fraction * len(train.labels)))
    counts = {label: train.labels.count(label) for label in set(train.labels)}
    eligible = [i for i, label in enumerate(train.labels) if counts[label] >= 2]
    rule = f"at most {task.dev_from_train} and {task.dev_from_train_fraction:g} of train"
    if wanted < 1 or not eligible:
        return None, train, f"none: {len(train.labels)} train examples are too few to hold out one ({rule})"
    sample = stratified_sample([train.labels[i] for i in eligible], wanted, task.sample_seed)
    dev_rows = [eligible[i] for i in sample]
    taken = set(dev_rows)
    dev = dataclasses.replace(split_rows(train, dev_rows), source=f"{train.source} ({len(dev_rows)} held out)")
    kept = split_rows(train, [i for i in range(len(train.labels)) if i not in taken])
    return dev, kept, f"{len(dev_rows)} of {len(train.labels)} train examples ({rule})"


def prompt_prefix(template: str) -> str:
    """A decoder's prompt: the template up to its mask, which the verbalizer word continues."""
    return template.split("{mask}")[0].rstrip()


def encode_split(tokenizer, split: EndTaskSplit, max_length: int, template: str | None = None,
                 causal: bool = False) -> dict[str, torch.Tensor]:
    """Tokenise (text, optional second text) pairs, right-padded to the longest and truncated to `max_length`.

    With a prompt `template`, each example becomes one text holding one mask token; for a decoder (`causal`),
    the template's text before the mask, cut from the left when too long (the end leads to the answer)."""
    if template is not None and causal:
        if "{text}" not in template.split("{mask}")[0]:
            raise BadInput(f"{split.source}: a decoder's prompt needs {{text}} before {{mask}} (it predicts the "
                           f"verbalizer word from what comes before), got {template!r}")
        pairs = split.text_pairs or [""] * len(split.texts)
        texts = [prompt_prefix(template).format(text=t, text_pair=p) for t, p in zip(split.texts, pairs)]
        encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", padding_side="right",
                            truncation_side="left", return_tensors="pt")
    elif template is not None:
        pairs = split.text_pairs or [""] * len(split.texts)
        texts = [template.format(text=t, text_pair=p, mask=tokenizer.mask_token) for t, p in zip(split.texts, pairs)]
        encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", padding_side="right",
                            return_tensors="pt")
        masks = (encoded["input_ids"] == tokenizer.mask_token_id).sum(-1)
        if not bool((masks == 1).all()):
            row = int((masks != 1).nonzero()[0])
            raise BadInput(f"{split.source} example {row + 1}: the prompt has {int(masks[row])} mask tokens after "
                           f"truncation to {max_length} tokens (need exactly 1; raise finetune.max_length)")
    elif split.text_pairs is not None:
        # aspect-style pairs: the short second text first, so truncation cuts the long sentence, not the aspect
        encoded = tokenizer(split.text_pairs, split.texts, truncation="only_second", max_length=max_length,
                            padding="longest", padding_side="right", return_tensors="pt")
    else:
        encoded = tokenizer(split.texts, truncation=True, max_length=max_length, padding="longest",
                            padding_side="right", return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if split.text_pairs is not None and template is None and "token_type_ids" in encoded:
        batch["token_type_ids"] = encoded["token_type_ids"]  # BERT-style segment ids mark the pair's two texts
    batch["labels"] = torch.tensor(split.labels, dtype=torch.long)
    return batch


def count_truncated(tokenizer, split: EndTaskSplit, max_length: int) -> int:
    """How many examples of a split are longer than `max_length` tokens (so lose their end to truncation)."""
    if split.text_pairs is not None:
        encoded = tokenizer(split.text_pairs, split.texts, truncation=False)
    else:
        encoded = tokenizer(split.texts, truncation=False)
    return sum(len(ids) > max_length for ids in encoded["input_ids"])
