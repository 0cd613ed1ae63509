"""The embedded default suite: a generated word-level language, its domains, and a small base LM for it.

Everything here is written by us and deterministic in a seed: no third-party text, nothing downloaded.

The language. A pool of *class words* (pseudo-words such as "kibo") is split into classes. A sentence lists
four words of one class ("rafu kibo teso nalu ."), so a word's class is learnable only from co-occurrence:
what fills a masked slot next to its class-mates. The general language (what the base LM is pretrained on)
uses the *general* partition. Each domain prefixes its sentences with a topic marker ("in tolvar ...") and
*moves* its own subset of the words to other classes: the same word means something else in that domain,
the way "unpredictable" is praise for a plot and a complaint about steering. Words that no domain moves
(the *anchor* words) keep their general class everywhere.

Why the effects appear. DAP on a domain moves its words (learned in a few hundred steps, because the base
LM already uses class-mates as context and the anchors hold the classes in place). A later domain that
does not move those words shows them in their general class again, so continual training on it undoes the
earlier domain (forgetting); domains that move the same words the same way (a shared group) transfer to each
other; and every domain contradicts the general partition on its words, so general knowledge is lost too.

End tasks. "Which class is this?" for two moved words of the same domain class ("in tolvar kibo teso"),
read through a prompt ("... [MASK] .") whose verbalizer is each class's anchor words. Test and training items
share no class word: training items use anchor words only, so the fine-tuned classifier cannot learn the
moved words' classes from the task and must rely on what DAP put into the LM. The general probe asks the
same of the moved words under the general partition (no marker), which the base LM knows and domains erode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

from cpt_bench.batches import mlm_blocks
from cpt_bench.cache import building, cache_dir, exclusive
from cpt_bench.data import read_corpus
from cpt_bench.errors import BadInput
from cpt_bench.plugin import Method
from cpt_bench.settings import DapSettings, Validated, build
from cpt_bench.stage import Stage
from cpt_bench.suite import load_suite
from cpt_bench.trainer import DapTrainer

GENERATOR_VERSION = 4


@dataclasses.dataclass
class SyntheticParams(Validated):
    """Shape of the generated language (the `generator.params` block of a suite YAML)."""

    domains: list[str] = dataclasses.field(default_factory=lambda: ["alpha", "beta", "gamma", "delta"])
    # domains in one group move the same words the same way (transfer); other groups move disjoint words
    shared_groups: list[list[str]] = dataclasses.field(default_factory=lambda: [["alpha", "beta"]])
    class_words: int = 60
    classes: int = 3
    anchor_words_per_class: int = 6  # never moved: the verbalizer and the end-task training items
    words_per_sentence: int = 4
    corpus_sentences: int = 6000  # unlabeled sentences per domain
    general_sentences: int = 12000
    train_items: int = 120
    test_items: int = 300
    heldout_sentences: int = 400  # held-out text per language, for the MLM perplexity matrix (never trained on)

    def check(self, where: str) -> None:
        if len(set(self.domains)) != len(self.domains) or "general" in self.domains:
            raise BadInput(f"{where}.domains: names must be unique and not 'general'")
        grouped = [d for g in self.shared_groups for d in g]
        if len(set(grouped)) != len(grouped) or not set(grouped) <= set(self.domains):
            raise BadInput(f"{where}.shared_groups: each domain at most once, and only listed domains")
        per_class = self.class_words // self.classes
        movable = per_class - self.anchor_words_per_class
        groups = len(self.domains) - len(grouped) + len(self.shared_groups)
        if self.class_words % self.classes or self.classes < 2 or movable < 2 * groups:
            raise BadInput(f"{where}: need class_words divisible by classes and at least 2 movable words per "
                           f"class for each of the {groups} domain groups")
        if self.words_per_sentence < 2 or self.words_per_sentence > self.anchor_words_per_class:
            raise BadInput(f"{where}.words_per_sentence: must be between 2 and anchor_words_per_class")


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
    """A partition of the class words (a domain's, or the general one) with the words it moved."""

    name: str
    marker: str | None  # topic word that starts every sentence (None: the general language)
    classes: list[list[str]]  # class index -> its words
    anchors: list[list[str]]  # class index -> anchor words (same in every language)
    moved: list[list[str]]  # class index -> words this language moved into the class (tested words)


def build_languages(seed: int, p: SyntheticParams) -> dict[str, Language]:
    rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}")
    taken: set[str] = set()
    per_class = p.class_words // p.classes
    general = [sorted(_pseudo_words(rng, per_class, taken)) for _ in range(p.classes)]
    anchors = [words[: p.anchor_words_per_class] for words in general]
    grouped = {d for g in p.shared_groups for d in g}
    groups = [list(g) for g in p.shared_groups] + [[d] for d in p.domains if d not in grouped]
    # each group moves its own share of every class's movable words, half to each other class (balanced)
    movable = [words[p.anchor_words_per_class:] for words in general]
    for words in movable:
        rng.shuffle(words)
    moves_by_group: list[dict[str, int]] = []
    for g in range(len(groups)):
        moves: dict[str, int] = {}
        for cls, words in enumerate(movable):
            share = words[g::len(groups)]
            others = [c for c in range(p.classes) if c != cls]
            for i, word in enumerate(share):
                moves[word] = others[i % len(others)]
        moves_by_group.append(moves)

    general_moved = [sorted({w for m in moves_by_group for w in m} & set(words)) for words in general]
    languages = {"general": Language("general", None, general, anchors, general_moved)}
    for g, group in enumerate(groups):
        moves = moves_by_group[g]
        classes = [[w for w in words if w not in moves] for words in general]
        moved: list[list[str]] = [[] for _ in range(p.classes)]
        for word, cls in sorted(moves.items()):
            classes[cls].append(word)
            moved[cls].append(word)
        for domain in group:
            marker = _pseudo_words(rng, 1, taken)[0]
            languages[domain] = Language(domain, marker, [sorted(c) for c in classes], anchors, moved)
    return dict(sorted(languages.items(), key=lambda kv: (kv[0] != "general", p.domains.index(kv[0])
                                                          if kv[0] in p.domains else -1)))


def _prefix(lang: Language) -> str:
    return "" if lang.marker is None else f"in {lang.marker} "


def _sentence(rng: random.Random, lang: Language, cls: int, size: int) -> str:
    return _prefix(lang) + " ".join(rng.sample(lang.classes[cls], size)) + " ."


def _items(rng: random.Random, lang: Language, count: int, words: list[list[str]]) -> list[dict[str, str]]:
    """Classification items: two words of one class (from `words`) after the language's marker."""
    pairs = {cls: list(itertools.permutations(ws, 2)) for cls, ws in enumerate(words) if len(ws) >= 2}
    items = []
    for i in range(count):
        cls = sorted(pairs)[i % len(pairs)]
        first, second = rng.choice(pairs[cls])
        items.append({"text": f"{_prefix(lang)}{first} {second}", "label": f"class{cls}"})
    rng.shuffle(items)
    return items


def generate(seed: int, p: SyntheticParams) -> dict[str, Any]:
    """All files of the suite: {relative path: rows (or an object for .json files)}."""
    languages = build_languages(seed, p)
    files: dict[str, Any] = {}
    for name, lang in languages.items():
        rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}-{name}")
        size = p.general_sentences if name == "general" else p.corpus_sentences
        files[f"{name}/unlabeled.jsonl"] = [
            {"text": _sentence(rng, lang, rng.randrange(p.classes), p.words_per_sentence)} for _ in range(size)]
        files[f"{name}/train.jsonl"] = _items(rng, lang, p.train_items, lang.anchors)
        files[f"{name}/test.jsonl"] = _items(rng, lang, p.test_items, lang.moved)
        files[f"{name}/verbalizer.json"] = {f"class{c}": words for c, words in enumerate(lang.anchors)}
        # its own random stream, so adding held-out text leaves every other file byte-identical
        heldout_rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}-{name}-heldout")
        files[f"{name}/heldout.jsonl"] = [
            {"text": _sentence(heldout_rng, lang, heldout_rng.randrange(p.classes), p.words_per_sentence)}
            for _ in range(p.heldout_sentences)]
    words = sorted({w for lang in languages.values() for c in lang.classes for w in c})
    markers = sorted(lang.marker for lang in languages.values() if lang.marker)
    files["vocabulary.jsonl"] = [{"text": w} for w in ["in", ".", *markers, *words]]
    files["languages.json"] = {name: dataclasses.asdict(lang) for name, lang in languages.items()}
    return files


def parse_params(generator) -> SyntheticParams:
    return build(SyntheticParams, generator.params, "suite generator.params")


def materialise(generator) -> Path:
    """Write the generated files once into the cache (keyed by generator, seed and params) and return it."""
    if generator.name != "synthetic":
        raise BadInput(f"unknown data generator {generator.name!r} (known: synthetic)")
    params = parse_params(generator)
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, generator.seed, dataclasses.asdict(params)],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "synthetic" / f"v{GENERATOR_VERSION}-{key}"
    if (path / "COMPLETE").exists():
        return path
    with building(path) as tmp:
        for relative, rows in generate(generator.seed, params).items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(rows, indent=1) + "\n" if relative.endswith(".json") else \
                "".join(json.dumps(r) + "\n" for r in rows)
            target.write_text(text, encoding="utf-8")
        (tmp / "COMPLETE").write_text("ok\n")
    return path


# ---------------------------------------------------------------- the base LM of the default suite

@dataclasses.dataclass
class BaseModelRecipe:
    """A small BERT pretrained with masked LM on the general language, so it already uses context.

    (A tiny transformer trained from scratch on a domain sits on unigram statistics for thousands of steps;
    pretrained on the general language it learns the general partition in ~300 steps and uses class-mates
    as context from then on: a valid "original LM".)"""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 64
    pretrain_steps: int = 500
    batch_size: int = 64
    seq_len: int = 32
    lr: float = 1e-3
    warmup: float = 0.05
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
    """Build (once) and cache the base LM of a generated suite: tokenizer, random init, general pretraining
    (the `synthetic-base` model alias)."""
    recipe = recipe or BaseModelRecipe()
    suite = load_suite(suite_name)
    data_dir = materialise(suite.generator)
    key = hashlib.sha256(json.dumps([data_dir.name, dataclasses.asdict(recipe)]).encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"{suite_name}-base-{key}"
    if (path / "COMPLETE").exists():
        return path
    with exclusive(path):
        if not (path / "COMPLETE").exists():  # another process may have built it while this one waited
            _pretrain_base_model(suite_name, recipe, data_dir, path)
    return path


def _pretrain_base_model(suite_name: str, recipe: BaseModelRecipe, data_dir: Path, path: Path) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import BertConfig, BertForMaskedLM

    vocabulary = [json.loads(line)["text"] for line in (data_dir / "vocabulary.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer(vocabulary, recipe.max_positions)
    set_seed(recipe.seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
                        num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
                        max_position_embeddings=recipe.max_positions, pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM(config)
    texts, where = read_corpus("general/unlabeled.jsonl", "text", data_dir, None)
    settings = DapSettings(steps=recipe.pretrain_steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len,
                           lr=recipe.lr, warmup=recipe.warmup)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    trainer = DapTrainer(accelerator, tokenizer, settings, Method(), recipe.seed, show_progress=False)
    blocks = mlm_blocks(texts, tokenizer, recipe.seq_len, where)
    print(f"building the base model of suite {suite_name!r}: {recipe.pretrain_steps} MLM steps on its general "
          f"language (once; cached in {path.parent})", file=sys.stderr, flush=True)
    trainer.train_stage(model.to(accelerator.device), blocks, Stage("general", ["general"]), 0)
    with building(path) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
        (tmp / "COMPLETE").write_text("ok\n")

