"""The embedded default suite: a generated word-level language, its domains, and a small base LM for it.

Everything here is written by us and deterministic in a seed: no third-party text, nothing downloaded. The
suite's seed is the run's seed (`generator.seed: run`), so every seed is a new language: a new partition, new
moves, new texts and its own base model.

The language. Pseudo-words ("kibo") in classes; each class has anchor words and *families* of words (concepts).
A sentence lists four words of one class, two of them from one family ("rafu kibo teso nalu ."), so a word's
class and family are learnable only from co-occurrence: what fills a masked slot next to its class-mates. The
general language (what the base LM is pretrained on) uses the *general* partition; half its sentences start
with a topic ("in tolvar ..."), which in the general language changes nothing, so the base LM knows every
topic word.

Domains: knowledge that depends on context. A domain is a topic whose sentences use *its own* partition: it
moves some families to other classes (the same word means something else there, the way "unpredictable" is
praise for a plot and a complaint about steering). A domain's corpus also holds general text about the
families it moved, in their general class, as real domain corpora hold everyday usage. The same word thus has
two classes in one corpus, told apart only by the topic word of its sentence: one embedding per word cannot
hold both. Domains in a shared group move the same families the same way (transfer); any two other groups
share one moved family per class and send it to different classes (conflict). Within a domain, families have
Zipf-distributed frequencies in a random order: rare ones are learned later, which grades what a stage of a
given length has learned. (Measured on the development seeds: even so, a 2-layer model learns a domain
fastest through the word embeddings; adapters and LoRA, which freeze them, learn little:
results/default-suite/design.md.)

End tasks. "Which class is this?" for two words of one class of the domain's partition, neither an anchor
("in tolvar kibo teso"), read through a prompt ("... [MASK] .") whose verbalizer is each class's anchor words.
Items mix moved words (the base LM's general class is wrong) and unmoved ones (the base LM is right), so
partial knowledge earns a partial score. Training items use anchor words only, so the fine-tuned task cannot
teach the tested words' classes: the score measures what DAP put into the LM. The general probe asks the same
of the movable words without a topic, which the base LM knows and domains erode.
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

from cpt_bench.common.cache import building, cache_dir, exclusive
from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import DapSettings, Validated, build
from cpt_bench.data.batches import lm_blocks
from cpt_bench.data.texts import read_corpus
from cpt_bench.training.plugin import Method
from cpt_bench.training.stage import Stage
from cpt_bench.training.trainer import DapTrainer

# part of every cache key of generated data: bump it with any change of what is generated (a test pins the bytes)
GENERATOR_VERSION = 6


@dataclasses.dataclass
class SyntheticParams(Validated):
    """Shape of the generated language (the `generator.params` block of a suite YAML)."""

    domains: list[str] = dataclasses.field(default_factory=lambda: ["alpha", "beta", "gamma", "delta"])
    # domains in one group move the same families the same way (transfer); other groups draw their own moves
    shared_groups: list[list[str]] = dataclasses.field(default_factory=lambda: [["alpha", "beta"]])
    classes: int = 3
    anchor_words_per_class: int = 6  # never moved: the verbalizer and the end-task training items
    families_per_class: int = 4  # word families (concepts) per class besides the anchors; a domain moves families
    family_size: int = 4
    moved_families_per_class: int = 2  # of each class's families, how many a domain group moves to another class
    words_per_sentence: int = 4
    family_words_per_sentence: int = 2  # words of one family in a sentence, the rest from its whole class
    topic_rate: float = 0.5  # fraction of general sentences that start with a topic ("in tolvar")
    general_rate: float = 0.25  # fraction of a domain corpus that is general text using the domain's moved words
    zipf: float = 1.0  # a domain's family frequencies fall as 1 / rank ** zipf (ranks in a random order)
    corpus_sentences: int = 6000  # unlabeled sentences per domain
    general_sentences: int = 12000
    train_items: int = 120
    test_items: int = 300
    heldout_sentences: int = 400  # held-out text per language, for the MLM perplexity matrix (never trained on)
    dev_sentences: int = 200  # a second held-out slice, for tuning (disjoint from the reported held-out text)

    def check(self, where: str) -> None:
        if len(set(self.domains)) != len(self.domains) or "general" in self.domains:
            raise BadInput(f"{where}.domains: names must be unique and not 'general'")
        grouped = [d for g in self.shared_groups for d in g]
        if len(set(grouped)) != len(grouped) or not set(grouped) <= set(self.domains):
            raise BadInput(f"{where}.shared_groups: each domain at most once, and only listed domains")
        groups = len(self.domains) - len(grouped) + len(self.shared_groups)
        if not self.moved_families_per_class <= groups <= self.families_per_class:
            raise BadInput(f"{where}: the {groups} domain groups must number between moved_families_per_class and "
                           f"families_per_class (each group moves families at its own positions)")
        if self.classes < 2 or self.family_size < 2 or not 1 <= self.moved_families_per_class < self.families_per_class:
            raise BadInput(f"{where}: need at least 2 classes, families of at least 2 words, and moved_families_per_"
                           f"class between 1 and families_per_class - 1")
        if not 1 <= self.family_words_per_sentence < self.words_per_sentence or \
                self.family_words_per_sentence > self.family_size or \
                self.words_per_sentence > self.anchor_words_per_class:
            raise BadInput(f"{where}.words_per_sentence: must exceed family_words_per_sentence (at most "
                           f"family_size) and be at most anchor_words_per_class")
        for name in ("topic_rate", "general_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BadInput(f"{where}.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.zipf < 0:
            raise BadInput(f"{where}.zipf: must be non-negative, got {self.zipf}")


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
    """A partition of the word families into classes (a domain's, or the general one)."""

    name: str
    marker: str | None  # the domain's topic word, which starts each of its sentences (None: general language)
    families: list[list[int]]  # class index -> indices (into `words`) of the families in that class
    moved: list[int]  # families this language moved to another class than the general one
    frequency: list[float]  # family index -> relative frequency in this language's sentences
    words: list[list[str]]  # family index -> its words (the same in every language)
    anchors: list[list[str]]  # class index -> anchor words (never moved; the same in every language)
    topics: list[str] = dataclasses.field(default_factory=list)  # general language: its topic words

    @property
    def classes(self) -> list[list[str]]:
        """class index -> its words: the anchors, then the words of its families."""
        return [self.anchors[c] + [w for f in families for w in self.words[f]]
                for c, families in enumerate(self.families)]

    def class_of(self, word: str) -> int:
        return next(c for c, words in enumerate(self.classes) if word in words)

    def moved_words(self) -> list[str]:
        return [w for f in self.moved for w in self.words[f]]


def build_languages(seed: int, p: SyntheticParams) -> dict[str, Language]:
    rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}")
    taken: set[str] = set()
    anchors = [sorted(_pseudo_words(rng, p.anchor_words_per_class, taken)) for _ in range(p.classes)]
    words = [sorted(_pseudo_words(rng, p.family_size, taken)) for _ in range(p.classes * p.families_per_class)]
    general_families = [list(range(c * p.families_per_class, (c + 1) * p.families_per_class))
                        for c in range(p.classes)]
    uniform = [1.0] * len(words)
    languages = {"general": Language("general", None, general_families, [], uniform, words, anchors)}
    grouped = {d for g in p.shared_groups for d in g}
    groups = [list(g) for g in p.shared_groups] + [[d] for d in p.domains if d not in grouped]
    # each class's families in a random order; group g moves the families at positions g, g+1, ... (mod the
    # number of groups), its first to one other class and the next to the other: two groups share one moved
    # family per class and send it to different classes (conflict), the same structure on every seed
    order = [rng.sample(members, len(members)) for members in general_families]
    targets = [rng.sample([c for c in range(p.classes) if c != cls], p.classes - 1) for cls in range(p.classes)]
    for g, group in enumerate(groups):
        families: list[list[int]] = [[] for _ in range(p.classes)]
        moves = {order[cls][(g + k) % len(groups)]: targets[cls][k % (p.classes - 1)]
                 for cls in range(p.classes) for k in range(p.moved_families_per_class)}
        for cls, members in enumerate(general_families):
            for family in members:
                families[moves.get(family, cls)].append(family)
        moved = sorted(moves)
        ranks = list(range(len(words)))
        rng.shuffle(ranks)  # Zipf frequencies over the families, in a random order
        frequency = [1.0 / (rank + 1) ** p.zipf for rank in ranks]
        for domain in group:
            marker = _pseudo_words(rng, 1, taken)[0]
            languages[domain] = Language(domain, marker, [sorted(f) for f in families], moved,
                                         frequency, words, anchors)
    languages["general"].topics = sorted(lang.marker for lang in languages.values() if lang.marker)
    return dict(sorted(languages.items(), key=lambda kv: (kv[0] != "general", p.domains.index(kv[0])
                                                          if kv[0] in p.domains else -1)))


def _sentence(rng: random.Random, lang: Language, p: SyntheticParams, family: int, prefix: str) -> str:
    """`family_words_per_sentence` words of `family`, the rest from the family's whole class in `lang`."""
    cls = next(c for c, families in enumerate(lang.families) if family in families)
    rest = [w for w in lang.classes[cls] if w not in lang.words[family]]
    chosen = rng.sample(lang.words[family], p.family_words_per_sentence) + \
        rng.sample(rest, p.words_per_sentence - p.family_words_per_sentence)
    rng.shuffle(chosen)
    return prefix + " ".join(chosen) + " ."


def _corpus(rng: random.Random, name: str, languages: dict[str, Language], p: SyntheticParams,
            size: int) -> list[dict[str, str]]:
    """Sentences of a language. General: a family at random, and at `topic_rate` a domain's topic word, which
    in the general language changes nothing. Domain: its topic and partition, a family drawn by the domain's
    frequencies; or, at `general_rate`, general text about one of the families the domain moved."""
    lang = languages[name]
    rows = []
    for _ in range(size):
        if name == "general":  # a topic word (at topic_rate) changes nothing in the general language
            prefix = f"in {rng.choice(lang.topics)} " if rng.random() < p.topic_rate else ""
            rows.append({"text": _sentence(rng, lang, p, rng.randrange(len(lang.words)), prefix)})
        elif rng.random() < p.general_rate:
            rows.append({"text": _sentence(rng, languages["general"], p, rng.choice(lang.moved), "")})
        else:
            family = rng.choices(range(len(lang.words)), weights=lang.frequency)[0]
            rows.append({"text": _sentence(rng, lang, p, family, f"in {lang.marker} ")})
    return rows


def _items(rng: random.Random, lang: Language, count: int, words: list[list[str]]) -> list[dict[str, str]]:
    """Classification items: two words of one class (from `words`) after the language's topic, if any."""
    prefix = "" if lang.marker is None else f"in {lang.marker} "
    pairs = {cls: list(itertools.permutations(ws, 2)) for cls, ws in enumerate(words) if len(ws) >= 2}
    items = []
    for i in range(count):
        cls = sorted(pairs)[i % len(pairs)]
        first, second = rng.choice(pairs[cls])
        items.append({"text": f"{prefix}{first} {second}", "label": f"class{cls}"})
    rng.shuffle(items)
    return items


def generate(seed: int, p: SyntheticParams) -> dict[str, Any]:
    """All files of the suite: {relative path: rows (or an object for .json files)}."""
    languages = build_languages(seed, p)
    files: dict[str, Any] = {}
    for name, lang in languages.items():
        rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}-{name}")
        size = p.general_sentences if name == "general" else p.corpus_sentences
        files[f"{name}/unlabeled.jsonl"] = _corpus(rng, name, languages, p, size)
        files[f"{name}/train.jsonl"] = _items(rng, lang, p.train_items, lang.anchors)
        tested = [[w for f in families for w in lang.words[f]] for families in lang.families]
        files[f"{name}/test.jsonl"] = _items(rng, lang, p.test_items, tested)
        files[f"{name}/verbalizer.json"] = {f"class{c}": words for c, words in enumerate(lang.anchors)}
        # own random streams, so adding a split leaves every other file byte-identical; dev (for tuning) and
        # held-out (reported) text are drawn apart
        for split, count in (("heldout", p.heldout_sentences), ("dev", p.dev_sentences)):
            split_rng = random.Random(f"synthetic-v{GENERATOR_VERSION}-{seed}-{name}-{split}")
            files[f"{name}/{split}.jsonl"] = _corpus(split_rng, name, languages, p, count)
    general = languages["general"]
    words = sorted({w for c in general.classes for w in c})
    files["vocabulary.jsonl"] = [{"text": w} for w in ["in", ".", *general.topics, *words]]
    files["languages.json"] = {name: {**dataclasses.asdict(lang), "classes": lang.classes}
                               for name, lang in languages.items()}
    return files


def parse_params(generator) -> SyntheticParams:
    return build(SyntheticParams, generator.params, "suite generator.params")


def materialise(generator, run_seed: int = 0) -> Path:
    """Write the generated files, and the recipe of their base LM, once into the cache (keyed by generator,
    seed, params and recipe) and return the folder. A generator seeded by "run" uses the run's seed."""
    if generator.name != "synthetic":
        raise BadInput(f"unknown data generator {generator.name!r} (known: synthetic)")
    params = parse_params(generator)
    seed = generator.seed_for(run_seed)
    recipe = build(BaseModelRecipe, {"seed": seed, **generator.base_model}, "suite generator.base_model")
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, seed, dataclasses.asdict(params),
                                     dataclasses.asdict(recipe)], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "synthetic" / f"v{GENERATOR_VERSION}-seed{seed}-{key}"
    if (path / "COMPLETE").exists():
        return path
    with building(path) as tmp:
        for relative, rows in generate(seed, params).items():
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(rows, indent=1) + "\n" if relative.endswith(".json") else \
                "".join(json.dumps(r) + "\n" for r in rows)
            target.write_text(text, encoding="utf-8")
        (tmp / BASE_MODEL_RECIPE).write_text(json.dumps(dataclasses.asdict(recipe), indent=1) + "\n")
        (tmp / "COMPLETE").write_text("ok\n")
    return path


# ---------------------------------------------------------------- the base LM of the default suite

BASE_MODEL_RECIPE = "base_model.json"  # in a generated suite's folder: how its base LM is built


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
    pretrain_steps: int = 1000  # 500 left the general language half learned (general probe 0.57, seed 100)
    batch_size: int = 64
    seq_len: int = 32
    lr: float = 2e-3
    warmup: float = 0.05
    seed: int = 0


def build_tokenizer(vocabulary: list[str], max_length: int, causal: bool = False):
    """A word-level tokenizer of a generated language: BERT's special tokens for an encoder; for a decoder
    (`causal`) only padding, unknown and end-of-text tokens, and no tokens added around a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if causal:
        specials = ["[PAD]", "[UNK]", "[EOS]"]
        tokenizer = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + vocabulary)},
                                               unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                       eos_token="[EOS]", model_max_length=max_length)
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


def build_base_model(data_dir: Path | None = None) -> Path:
    """Build (once) and cache the base LM of a generated suite's folder: tokenizer, random init, MLM
    pretraining on the general language, by the folder's recipe (the `synthetic-base` model alias)."""
    return _build_base(data_dir, causal=False)


def build_base_gpt(data_dir: Path | None = None) -> Path:
    """The same for a decoder (the `synthetic-gpt` alias): a GPT-2-style model of the recipe's size, next-token
    pretraining on the general language with a word-level tokenizer whose texts end in [EOS]."""
    return _build_base(data_dir, causal=True)


def _build_base(data_dir: Path | None, causal: bool) -> Path:
    alias = "synthetic-gpt" if causal else "synthetic-base"
    if data_dir is None or not (Path(data_dir) / BASE_MODEL_RECIPE).is_file():
        raise BadInput(f"model '{alias}' is the base LM of a generated suite (synthetic); use it with such a suite")
    data_dir = Path(data_dir)
    recipe = build(BaseModelRecipe, json.loads((data_dir / BASE_MODEL_RECIPE).read_text()), str(data_dir))
    key = hashlib.sha256(json.dumps([data_dir.name, dataclasses.asdict(recipe)]).encode()).hexdigest()[:12]
    path = cache_dir() / "models" / f"{alias}-{key}"
    if (path / "COMPLETE").exists():
        return path
    with exclusive(path):
        if not (path / "COMPLETE").exists():  # another process may have built it while this one waited
            _pretrain_base_model(recipe, data_dir, path, causal)
    return path


def _pretrain_base_model(recipe: BaseModelRecipe, data_dir: Path, path: Path, causal: bool = False) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    vocabulary = [json.loads(line)["text"] for line in (data_dir / "vocabulary.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer(vocabulary, recipe.max_positions, causal)
    set_seed(recipe.seed)
    if causal:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_embd=recipe.hidden, n_layer=recipe.layers, n_head=recipe.heads,
            n_inner=recipe.intermediate, n_positions=recipe.max_positions, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    else:
        model = BertForMaskedLM(BertConfig(
            vocab_size=len(tokenizer), hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
            num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
            max_position_embeddings=recipe.max_positions, pad_token_id=tokenizer.pad_token_id))
    texts, where = read_corpus("general/unlabeled.jsonl", "text", data_dir, None)
    settings = DapSettings(steps=recipe.pretrain_steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len,
                           lr=recipe.lr, warmup=recipe.warmup)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    trainer = DapTrainer(accelerator, tokenizer, settings, Method(), recipe.seed, show_progress=False)
    blocks = lm_blocks(texts, tokenizer, recipe.seq_len, where, causal)
    objective = "next-token" if causal else "MLM"
    print(f"building the {'decoder ' if causal else ''}base model of the generated suite (seed {recipe.seed}): "
          f"{recipe.pretrain_steps} {objective} steps on its general language (once; cached in {path.parent})",
          file=sys.stderr, flush=True)
    trainer.train_stage(model.to(accelerator.device), blocks, Stage("general", ["general"]), 0)
    with building(path) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
        (tmp / "COMPLETE").write_text("ok\n")
