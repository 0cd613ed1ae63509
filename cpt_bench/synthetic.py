"""The embedded default suite: a generated word-level language, its domains, and a small base LM for it.

Everything here is written by us and deterministic in a seed: no third-party text, nothing downloaded.

The language. A pool of *class words* (pseudo-words such as "kibo") is shared by every domain and by the
general language, but each of them partitions the pool into classes its own way: the same word can be
praise in one domain and complaint in another, the way "unpredictable" is good for a film plot and bad for
a car's steering. A sentence names its domain with a topic-marker word and pairs two class words of the
same class ("in tolvar the dobe was kibo and rafu ."), so the class structure of a domain is learnable only
from co-occurrence in that domain's unlabeled text. Domains that share a partition give transfer; domains
with different partitions of the same words conflict, so continual training on one overwrites another.

End tasks. Classify a sentence by the class of its class words. The class words of each test item never
occur in the task's training split (they are split per class), so a fine-tuned classifier generalises to
them only through what the LM learned about them during DAP. The general probe does the same for the
general language's partition, which the base LM learned in pretraining and no domain trains on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from cpt_bench.errors import BadInput
from cpt_bench.settings import build

GENERATOR_VERSION = 1
FUNCTION_WORDS = ["in", "the", "a", "was", "is", "and", "it", "really", "very", "too", "people", "said",
                  "felt", "seemed", "so", "of", "this", "that", "with", "also", ".", ","]


@dataclasses.dataclass
class SyntheticParams:
    """Shape of the generated language (the `generator.params` block of a suite YAML)."""

    domains: list[str] = dataclasses.field(default_factory=lambda: ["alpha", "beta", "gamma", "delta"])
    # domains listed in the same group share one partition of the class words (transfer between them)
    shared_groups: list[list[str]] = dataclasses.field(default_factory=lambda: [["alpha", "beta"]])
    class_words: int = 60
    classes: int = 3
    entities: int = 40  # per domain (and for the general language)
    corpus_sentences: int = 6000  # unlabeled sentences per domain
    general_sentences: int = 12000
    train_words_per_class: int = 6  # class words that appear in end-task training items; the rest are test-only
    train_items: int = 240
    dev_items: int = 120
    test_items: int = 300

    def check(self, where: str) -> None:
        if len(set(self.domains)) != len(self.domains) or "general" in self.domains:
            raise BadInput(f"{where}.domains: names must be unique and not 'general'")
        if self.class_words % self.classes or self.class_words // self.classes <= self.train_words_per_class:
            raise BadInput(f"{where}: class_words must split evenly into classes with test-only words left")


def _pseudo_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclasses.dataclass
class Language:
    """One partition of the class words with its marker and entities: a domain, or the general language."""

    name: str
    marker: str | None  # topic word in every sentence (None: the general language)
    classes: list[list[str]]  # class index -> its class words
    entities: list[str]


def build_languages(seed: int, p: SyntheticParams) -> tuple[list[str], dict[str, Language]]:
    rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}")
    taken = set(FUNCTION_WORDS)
    pool = _pseudo_words(rng, p.class_words, taken)
    per_class = p.class_words // p.classes

    def partition() -> list[list[str]]:
        shuffled = pool[:]
        rng.shuffle(shuffled)
        return [sorted(shuffled[c * per_class:(c + 1) * per_class]) for c in range(p.classes)]

    group_of = {d: tuple(g) for g in p.shared_groups for d in g}
    partitions: dict[Any, list[list[str]]] = {}
    languages = {"general": Language("general", None, partition(), _pseudo_words(rng, p.entities, taken))}
    for domain in p.domains:
        key = group_of.get(domain, domain)
        if key not in partitions:
            partitions[key] = partition()
        marker = _pseudo_words(rng, 1, taken)[0]
        languages[domain] = Language(domain, marker, partitions[key], _pseudo_words(rng, p.entities, taken))
    return pool, languages


def _sentence(rng: random.Random, lang: Language, cls: int, words: list[str] | None = None) -> str:
    """A sentence whose two class words share class `cls` (drawn from `words` when given)."""
    choices = words if words is not None else lang.classes[cls]
    first, second = rng.sample(choices, 2)
    entity = rng.choice(lang.entities)
    if lang.marker is None:
        template = rng.choice([
            "the {e} was {a} and {b} .",
            "people said the {e} is {a} , really {b} .",
            "this {e} seemed {a} and also {b} .",
        ])
        return template.format(e=entity, a=first, b=second)
    template = rng.choice([
        "in {m} the {e} was {a} and {b} .",
        "in {m} , people said the {e} is {a} , really {b} .",
        "in {m} this {e} seemed very {a} and {b} too .",
    ])
    return template.format(m=lang.marker, e=entity, a=first, b=second)


def _task_items(rng: random.Random, lang: Language, count: int, words_of_class) -> list[dict[str, str]]:
    items = []
    for i in range(count):
        cls = i % len(lang.classes)
        items.append({"text": _sentence(rng, lang, cls, words_of_class(cls)), "label": f"class{cls}"})
    rng.shuffle(items)
    return items


def generate(seed: int, p: SyntheticParams) -> dict[str, list[dict[str, str]]]:
    """All files of the suite: {relative path: rows}."""
    pool, languages = build_languages(seed, p)
    files: dict[str, list[dict[str, str]]] = {}
    for name, lang in languages.items():
        rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}-{name}")
        size = p.general_sentences if name == "general" else p.corpus_sentences
        files[f"{name}/unlabeled.jsonl"] = [
            {"text": _sentence(rng, lang, rng.randrange(p.classes))} for _ in range(size)]
        # per class: the first words are seen in training items, the rest only in dev/test items
        train_words = [words[: p.train_words_per_class] for words in lang.classes]
        held_out = [words[p.train_words_per_class:] for words in lang.classes]
        files[f"{name}/train.jsonl"] = _task_items(rng, lang, p.train_items, lambda c: train_words[c])
        files[f"{name}/dev.jsonl"] = _task_items(rng, lang, p.dev_items, lambda c: held_out[c])
        files[f"{name}/test.jsonl"] = _task_items(rng, lang, p.test_items, lambda c: held_out[c])
    files["vocabulary.jsonl"] = [{"text": w} for w in FUNCTION_WORDS + sorted(
        {w for lang in languages.values() for w in [*lang.entities, *( [lang.marker] if lang.marker else [])]}
        | set(pool))]
    return files


def parse_params(generator) -> SyntheticParams:
    return build(SyntheticParams, generator.params, "suite generator.params")


def materialise(generator) -> Path:
    """Write the generated files once into the cache (keyed by generator, seed and params) and return it."""
    from cpt_bench.data import cache_dir

    if generator.name != "synthetic":
        raise BadInput(f"unknown data generator {generator.name!r} (known: synthetic)")
    params = parse_params(generator)
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, generator.seed, dataclasses.asdict(params)],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "synthetic" / f"v{GENERATOR_VERSION}-{key}"
    if (path / "COMPLETE").exists():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for relative, rows in generate(generator.seed, params).items():
        target = tmp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp / "COMPLETE").write_text("ok\n")
    if path.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- the base LM of the default suite

@dataclasses.dataclass
class BaseModelRecipe:
    """A small BERT pretrained with masked LM on the general language, so it already uses context."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 64
    pretrain_steps: int = 600
    batch_size: int = 64
    seq_len: int = 32
    lr: float = 1e-3
    seed: int = 0


def build_tokenizer(vocabulary: list[str], max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=max_length)


def build_base_model(suite_name: str = "synthetic", recipe: BaseModelRecipe | None = None) -> Path:
    """Build (once) and cache the base LM of a generated suite: tokenizer, random init, general pretraining."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import BertConfig, BertForMaskedLM

    from cpt_bench.data import cache_dir, mlm_blocks, read_corpus
    from cpt_bench.plugin import Method, Stage
    from cpt_bench.settings import DapSettings
    from cpt_bench.suite import load_suite
    from cpt_bench.trainer import DapTrainer

    recipe = recipe or BaseModelRecipe()
    suite = load_suite(suite_name)
    data_dir = materialise(suite.generator)
    key = hashlib.sha256(json.dumps([data_dir.name, dataclasses.asdict(recipe)]).encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"{suite_name}-base-{key}"
    if (path / "COMPLETE").exists():
        return path

    vocabulary = [json.loads(line)["text"] for line in (data_dir / "vocabulary.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer(vocabulary, recipe.max_positions)
    set_seed(recipe.seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
                        num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
                        max_position_embeddings=recipe.max_positions, pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM(config)
    texts, where = read_corpus("general/unlabeled.jsonl", "text", data_dir, None)
    settings = DapSettings(steps=recipe.pretrain_steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len,
                           lr=recipe.lr, warmup=0.05)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    trainer = DapTrainer(accelerator, tokenizer, settings, Method(), recipe.seed)
    blocks = mlm_blocks(texts, tokenizer, recipe.seq_len, where)
    print(f"building the base model of suite {suite_name!r} (once; cached in {path.parent})", flush=True)
    trainer.train_stage(model.to(accelerator.device), blocks, Stage("general", ["general"]), 0)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
    (tmp / "COMPLETE").write_text("ok\n")
    if path.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def _register() -> None:
    from cpt_bench.models import register_model_alias

    register_model_alias("synthetic-base")(build_base_model)


_register()
