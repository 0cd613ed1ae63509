"""The uniform end-task evaluator: a fresh classification head on a copy of the LM's encoder, fine-tuned
with the task's settings, model selection on dev when there is one, test macro-F1 and accuracy. A task may
instead choose `evaluator: probe`: a linear probe on the frozen encoder, much cheaper and not the paper's
protocol (`linear_probe_scores`)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.common.progress import progress_bar
from cpt_bench.common.settings import FinetuneSettings, build
from cpt_bench.data.texts import EndTaskData, count_truncated, encode_split, prompt_prefix, stratified_sample
from cpt_bench.models.loading import is_causal_lm, lm_body, lm_head
from cpt_bench.training.checkpoint import StopRequested
from cpt_bench.training.optim import adamw, linear_schedule


@functools.cache
def classification_metric():
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "metrics" / "classification" / "classification.py"))


def score(predictions: list[int], references: list[int], num_labels: int, average: str = "macro") -> dict:
    """Macro-F1 over the classes that occur in the references or the predictions (scikit-learn's default,
    and the paper's scorer): a label missing from a small test split is not counted as F1 = 0."""
    if predictions and max(max(predictions), max(references, default=0)) >= num_labels:
        raise ValueError(f"class id outside the task's {num_labels} labels")
    result = classification_metric().compute(predictions=predictions, references=references, average=average)
    return {"macro_f1": float(result["f1"]), "accuracy": float(result["accuracy"])}


class SequenceClassifier(nn.Module):
    """Body + a fresh head (dense, tanh, linear: the RoBERTa classification head) on the first token of an
    encoder, or on the last real token of a decoder (the only one that has read the whole text; right padding)."""

    def __init__(self, body: nn.Module, hidden_size: int, num_labels: int, dropout: float, last_token: bool = False):
        super().__init__()
        self.body = body
        self.last_token = last_token
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.body(**inputs)[0]
        if self.last_token:
            pooled = hidden[torch.arange(len(hidden), device=hidden.device), attention_mask.sum(-1) - 1]
        else:
            pooled = hidden[:, 0]
        return self.out(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class PromptClassifier(nn.Module):
    """The LM itself as classifier: a label's score is the log-sum-exp of its verbalizer words' MLM logits
    at the prompt's mask (prompt-based fine-tuning, Schick & Schütze 2021; Gao et al. 2021)."""

    def __init__(self, lm: nn.Module, label_token_ids: list[list[int]], mask_token_id: int):
        super().__init__()
        self.lm = lm
        self.label_token_ids = [torch.tensor(ids) for ids in label_token_ids]
        self.mask_token_id = mask_token_id

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = lm_body(self.lm)(input_ids=input_ids, attention_mask=attention_mask)[0]
        logits = lm_head(self.lm)(hidden[input_ids == self.mask_token_id])  # one mask per row
        return torch.stack([torch.logsumexp(logits[:, ids.to(logits.device)], dim=-1)
                            for ids in self.label_token_ids], dim=-1)


class CausalPromptClassifier(nn.Module):
    """A decoder as classifier: a label's score is the log-sum-exp over its verbalizer words of the word's
    summed next-token log-probability as the continuation of the prompt (a word may be several tokens)."""

    def __init__(self, lm: nn.Module, label_continuations: list[list[list[int]]], pad_token_id: int):
        super().__init__()
        self.lm = lm
        self.candidates = [(label, ids) for label, words in enumerate(label_continuations) for ids in words]
        self.num_labels = len(label_continuations)
        self.pad_token_id = pad_token_id

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        lengths = attention_mask.sum(-1).tolist()
        rows = [torch.cat([ids[:length], torch.tensor(cont, device=ids.device)])
                for ids, length in zip(input_ids, lengths) for _, cont in self.candidates]
        width = max(len(row) for row in rows)
        sequences = torch.full((len(rows), width), self.pad_token_id, device=input_ids.device)
        mask = torch.zeros_like(sequences)
        for i, row in enumerate(rows):
            sequences[i, : len(row)], mask[i, : len(row)] = row, 1
        hidden = lm_body(self.lm)(input_ids=sequences, attention_mask=mask)[0]
        log_probs = lm_head(self.lm)(hidden[:, :-1]).float().log_softmax(-1)
        token_scores = log_probs.gather(-1, sequences[:, 1:, None]).squeeze(-1)
        # the continuation's tokens sit at positions length .. length+k-1, predicted one position earlier
        positions = torch.arange(width - 1, device=input_ids.device)
        starts = torch.tensor([length - 1 for length in lengths for _ in self.candidates], device=input_ids.device)
        sizes = torch.tensor([len(cont) for _ in lengths for _, cont in self.candidates], device=input_ids.device)
        scored = (positions >= starts[:, None]) & (positions < (starts + sizes)[:, None])
        word_scores = (token_scores * scored).sum(-1).view(len(lengths), len(self.candidates))
        labels = torch.tensor([label for label, _ in self.candidates], device=input_ids.device)
        return torch.stack([torch.logsumexp(word_scores[:, labels == k], dim=-1) for k in range(self.num_labels)],
                           dim=-1)


def verbalizer_continuations(tokenizer, task: EndTaskData) -> list[list[list[int]]]:
    """Each label's words as a decoder's continuation token ids: the word after the template's separator before
    the mask (usually a space), tokenised on its own; a word of several tokens is scored by their sum."""
    separator = task.template.split("{mask}")[0][len(prompt_prefix(task.template)):]
    out = []
    for label in task.label_names:
        words = []
        for word in task.verbalizer[label]:
            ids = tokenizer(separator + word, add_special_tokens=False)["input_ids"]
            if not ids or tokenizer.unk_token_id in ids:
                raise BadInput(f"end task {task.name}: verbalizer word {word!r} is not in the model's vocabulary")
            words.append(ids)
        out.append(words)
    return out


def verbalizer_token_ids(tokenizer, task: EndTaskData) -> list[list[int]]:
    """Each label's words as single vocabulary ids (a word that is not one token is an error)."""
    ids = []
    for label in task.label_names:
        label_ids = []
        for word in task.verbalizer[label]:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
                raise BadInput(f"end task {task.name}: verbalizer word {word!r} is not a single token of the model")
            label_ids.append(pieces[0])
        ids.append(label_ids)
    return ids


def check_end_task(tokenizer, defaults: FinetuneSettings, task: EndTaskData, lm: nn.Module | None = None) -> None:
    """Fail early (before any training) on settings or inputs the evaluator cannot use."""
    if task.evaluator == "probe" and lm is not None and not has_encoder(lm):
        raise BadInput(f"end task {task.name}: evaluator 'probe' needs a model with an encoder (bidirectional "
                       f"features to pool); {type(lm).__name__} has none")
    causal = lm is not None and is_causal_lm(lm)
    settings = task_settings(defaults, task)
    for split in (task.train, task.dev, task.test):
        if split is not None:
            encode_split(tokenizer, split, settings.max_length, task.template, causal)
    if task.evaluator == "prompt":
        (verbalizer_continuations if causal else verbalizer_token_ids)(tokenizer, task)


def has_encoder(lm: nn.Module) -> bool:
    """Whether the LM's body is a bidirectional encoder (a decoder's causal features are not what the linear
    probe pools)."""
    return not is_causal_lm(lm) and not getattr(getattr(lm, "config", None), "is_decoder", False) and \
        lm_body(lm) is not lm


# the linear probe's regularisation grid (inverse strength C of scikit-learn's LogisticRegression), chosen on dev
LINEAR_PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
LINEAR_PROBE_DEV_FRACTION = 0.2  # of train, held out to choose C when the task has no dev split


def linear_probe_scores(features: dict[str, torch.Tensor], labels: dict[str, list[int]], task: EndTaskData,
                        seed: int) -> dict[str, float]:
    """A logistic-regression head on frozen features: C chosen by dev macro-F1 (the smallest C wins ties; with
    no dev split, on a stratified fifth of train, then refitted on all of train), test scores of that model."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = features["train"].double().numpy(), labels["train"]
    if "dev" in features:
        fit_x, fit_y, dev_x, dev_y = train_x, train_y, features["dev"].double().numpy(), labels["dev"]
    else:
        dev_rows = stratified_sample(train_y, max(1, int(LINEAR_PROBE_DEV_FRACTION * len(train_y))), seed)
        held = set(dev_rows)
        fit_rows = [i for i in range(len(train_y)) if i not in held]
        fit_x, fit_y = train_x[fit_rows], [train_y[i] for i in fit_rows]
        dev_x, dev_y = train_x[dev_rows], [train_y[i] for i in dev_rows]

    def fitted(x, y, c):
        scaler = StandardScaler().fit(x)
        head = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
        return lambda z: head.predict(scaler.transform(z)).tolist()

    if len(set(fit_y)) < 2 or len(set(train_y)) < 2:  # one class to learn: predict it (no model to fit)
        majority = max(set(train_y), key=train_y.count)
        return score([majority] * len(labels["test"]), labels["test"], len(task.label_names), task.average)
    dev_f1 = [score(fitted(fit_x, fit_y, c)(dev_x), dev_y, len(task.label_names), task.average)["macro_f1"]
              for c in LINEAR_PROBE_C_GRID]
    best = LINEAR_PROBE_C_GRID[dev_f1.index(max(dev_f1))]
    predict = fitted(train_x, train_y, best)
    test = score(predict(features["test"].double().numpy()), labels["test"], len(task.label_names), task.average)
    return {**test, "probe_c": best}


def trimmed(split: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows of an encoded split, cut to their own longest example: a split is padded to its longest
    text, and attending over that padding in every batch wastes compute (right padding, so a prefix is kept)."""
    batch = {k: v[rows] for k, v in split.items()}
    length = int(batch["attention_mask"].sum(-1).max())
    return {k: (v[:, :length] if v.dim() == 2 else v) for k, v in batch.items()}


def task_settings(defaults: FinetuneSettings, task: EndTaskData) -> FinetuneSettings:
    if not task.finetune_overrides:
        return defaults
    return build(FinetuneSettings, {**dataclasses.asdict(defaults), **task.finetune_overrides},
                 f"end task {task.name}.finetune")


class EndTaskEvaluator:
    def __init__(self, accelerator, tokenizer, settings: FinetuneSettings, show_progress: bool = True,
                 causal: bool = False):
        self.accelerator = accelerator
        self.causal = causal  # a decoder: prompts are continued, not filled in
        self.tokenizer = tokenizer
        self.settings = settings
        self.show_progress = show_progress and accelerator.is_local_main_process
        self._encoded: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}
        self.truncated: dict[str, dict[str, int]] = {}  # task -> split -> examples cut to max_length
        self.stop = None  # a checkpoint.StopSignal: a fine-tune is abandoned (and redone on resume) when it fires

    def _split(self, task: EndTaskData, which: str, max_length: int) -> dict[str, torch.Tensor] | None:
        split = getattr(task, which)
        if split is None:
            return None
        key = (task.name, which, max_length)
        if key not in self._encoded:
            self._encoded[key] = encode_split(self.tokenizer, split, max_length, task.template, self.causal)
            if task.template is None:  # a prompt that loses its mask to truncation is refused in encode_split
                cut = count_truncated(self.tokenizer, split, max_length)
                self.truncated.setdefault(task.name, {})[which] = cut
                if cut:
                    print(f"end task {task.name} {which}: {cut} of {len(split.labels)} examples are longer than "
                          f"{max_length} tokens and were truncated", file=sys.stderr, flush=True)
        return self._encoded[key]

    def classifier(self, lm: nn.Module, task: EndTaskData) -> nn.Module:
        if task.evaluator == "prompt" and self.causal:
            return CausalPromptClassifier(copy.deepcopy(lm), verbalizer_continuations(self.tokenizer, task),
                                          self.tokenizer.pad_token_id)
        if task.evaluator == "prompt":
            return PromptClassifier(copy.deepcopy(lm), verbalizer_token_ids(self.tokenizer, task),
                                    self.tokenizer.mask_token_id)
        config = lm.config
        return SequenceClassifier(copy.deepcopy(lm_body(lm)), config.hidden_size, len(task.label_names),
                                  getattr(config, "hidden_dropout_prob", 0.1), last_token=is_causal_lm(lm))

    def evaluate(self, lm: nn.Module, task: EndTaskData, seed: int) -> dict[str, float]:
        """Fine-tune a copy of `lm` (its encoder with a fresh head, or the whole LM through a prompt) on `task`,
        or fit a linear probe on its frozen features; return test scores."""
        if task.evaluator == "probe":
            return self.linear_probe(lm, task, seed)
        s = task_settings(self.settings, task)
        device = self.accelerator.device
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = self.classifier(lm, task).to(device)
        train = self._split(task, "train", s.max_length)
        dev = self._split(task, "dev", s.max_length)
        test = self._split(task, "test", s.max_length)
        n = len(train["labels"])
        steps_per_epoch = -(-n // s.batch_size)
        total = steps_per_epoch * s.epochs
        named = {id(p): name for name, p in model.named_parameters()}
        trained = [p for p in model.parameters() if p.requires_grad]
        if not trained:
            raise ValueError(f"end task {task.name}: the LM given for fine-tuning has no trainable parameter")
        optimizer = adamw(trained, named, s.lr, s.weight_decay)
        scheduler = linear_schedule(optimizer, int(s.warmup * total), total)
        generator = torch.Generator().manual_seed(seed)
        best_state, best_dev = None, -1.0
        bar = progress_bar(total, f"fine-tune {task.name}", self.show_progress)
        for _ in range(s.epochs):
            model.train()
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, s.batch_size):
                batch = {k: v.to(device) for k, v in trimmed(train, order[start: start + s.batch_size]).items()}
                with self.accelerator.autocast():
                    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
                loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
                loss.backward()
                if s.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(trained, s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                if self.stop is not None and self.stop.requested:
                    bar.close()
                    raise StopRequested(f"stopped by {self.stop.requested} while fine-tuning {task.name} (its "
                                        f"fine-tune starts over on resume; finished ones are kept)")
            if dev is not None:
                dev_f1 = self._scores(model, dev, task)["macro_f1"]
                if dev_f1 > best_dev:  # earliest best epoch wins ties
                    best_dev = dev_f1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        return {**self._scores(model, test, task), "seconds": round(time.perf_counter() - started, 3)}

    @torch.no_grad()
    def features(self, lm: nn.Module, split: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean over real tokens of the encoder's last hidden states, one row per example (dropout off)."""
        body = lm_body(lm)
        was_training = body.training
        body.eval()
        rows = []
        batch_size = max(64, self.settings.batch_size)
        for start in range(0, len(split["labels"]), batch_size):
            batch = trimmed(split, torch.arange(start, min(start + batch_size, len(split["labels"]))))
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            with self.accelerator.autocast():
                hidden = body(**inputs)[0].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
        body.train(was_training)
        return torch.cat(rows)

    def linear_probe(self, lm: nn.Module, task: EndTaskData, seed: int) -> dict[str, float]:
        started = time.perf_counter()
        max_length = task_settings(self.settings, task).max_length
        splits = {which: self._split(task, which, max_length) for which in ("train", "dev", "test")}
        splits = {which: split for which, split in splits.items() if split is not None}
        features = {which: self.features(lm, split) for which, split in splits.items()}
        labels = {which: split["labels"].tolist() for which, split in splits.items()}
        return {**linear_probe_scores(features, labels, task, seed), "seconds": round(time.perf_counter() - started, 3)}

    @torch.no_grad()
    def _scores(self, model: nn.Module, split: dict[str, torch.Tensor], task: EndTaskData) -> dict[str, float]:
        model.eval()
        predictions = []
        batch_size = max(64, self.settings.batch_size)
        for start in range(0, len(split["labels"]), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(split["labels"])))
            batch = {k: v.to(self.accelerator.device) for k, v in trimmed(split, rows).items()}
            with self.accelerator.autocast():
                logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            predictions.append(logits.argmax(-1).cpu())
        predicted = torch.cat(predictions).tolist()
        return score(predicted, split["labels"].tolist(), len(task.label_names), task.average)
