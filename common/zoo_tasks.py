"""The expert zoo's tasks: real offline data (PyPI packages), one record format, one split for all tasks.

Every task is a list of records with the fields
    task     the task's name
    kind     "classification" (scored by rank classification over `choices`) or "generation" (Rouge-L)
    input    the raw text (what the leak check compares)
    source   the prompt the model reads
    target   the answer (one of `choices` for classification)
    choices  the answer strings ([] for generation)
    label    the index of `target` in `choices` (-1 for generation)
    group    what must not cross splits (a tweet, a GSM template, a stdlib file, a play, a tumour)

Splits are drawn per *group* by a hash of (split seed, group), not per task: a tweet that is in two
tasks (e.g. airline sentiment and tweet topic) or a GSM template in five (language ID, translation,
solutions) falls in the same split everywhere, so no test text of any task - held-out ones included -
is ever in a training set (`leak_report` checks it). Training text is `source + " " + target + EOS`
(mttl's format); classification scores the continuation `" " + choice`.

Library tasks train experts; held-out tasks are never trained on: `language_id_union` needs both
language-ID experts' languages, the others are close to one expert's skill (sentiment on unseen tweet
topics, translation from unseen languages). Data cards: docs/data_cards.md.
"""

from __future__ import annotations

import ast
import hashlib
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.registry import lookup

SPLIT_SEED = 0  # splits never vary with the training seed
FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}
GENERATION_TARGET_WORDS = 25  # generation targets are cut to their first words (<= ~48 tokens)

LANGUAGE_NAMES = {
    "eng": "English",
    "fra": "French",
    "spa": "Spanish",
    "ita": "Italian",
    "por": "Portuguese",
    "deu": "German",
    "nld": "Dutch",
    "pol": "Polish",
    "ces": "Czech",
    "rus": "Russian",
    "swe": "Swedish",
    "dan": "Danish",
    "ron": "Romanian",
    "cat": "Catalan",
}
LANGUAGES_A = ("eng", "fra", "spa", "ita", "por")
LANGUAGES_B = ("deu", "nld", "pol", "ces", "rus")
TRANSLATE_SEEN = ("fra", "spa", "deu", "nld")
TRANSLATE_UNSEEN = ("swe", "dan", "ron", "cat")
CODE_PACKAGES = ("asyncio", "email", "multiprocessing", "xml", "importlib")
CANCER_FEATURES = 10  # the ten "mean ..." features of the Wisconsin breast-cancer table


@dataclass(frozen=True)
class Task:
    """A zoo task: how to build its records and whether experts are trained on it."""

    build: Callable[[], list[dict[str, Any]]]
    held_out: bool = False
    note: str = ""


def _record(
    task: str, source: str, target: str, group: Any, input_text: str, choices: Sequence[str] = ()
) -> dict[str, Any]:
    choices = list(choices)
    return {
        "task": task,
        "kind": "classification" if choices else "generation",
        "input": input_text,
        "source": source,
        "target": target,
        "choices": choices,
        "label": choices.index(target) if choices else -1,
        "group": str(group),
    }


def _first_words(text: str, n: int = GENERATION_TARGET_WORDS) -> str:
    words = text.split(" ")
    return " ".join(words[:n]).strip()


# --- builders --------------------------------------------------------------------------------------


def _sentiment(topic: str) -> Callable[[], list[dict[str, Any]]]:
    def build() -> list[dict[str, Any]]:
        from common.data.text_tasks import SENTIMENTS, tweet_sentiment

        name = f"sentiment_{topic.replace('-', '_')}"
        return [
            _record(
                name,
                f"Tweet: {r['input']}\nIs the sentiment of this tweet negative, neutral or positive?\nAnswer:",
                r["target"],
                r["group"],
                r["input"],
                SENTIMENTS,
            )
            for r in tweet_sentiment(topic)
        ]

    return build


def _tweet_topic() -> list[dict[str, Any]]:
    from common.data.text_tasks import TOPICS, tweet_topic

    return [
        _record(
            "tweet_topic",
            f"Tweet: {r['input']}\nIs this tweet about airline, apple, coachella, deflategate or "
            "self-driving?\nAnswer:",
            r["target"],
            r["group"],
            r["input"],
            TOPICS,
        )
        for r in tweet_topic()
    ]


def _shakespeare_genre() -> list[dict[str, Any]]:
    from common.data.text_tasks import GENRES, shakespeare_genre

    return [
        _record(
            "shakespeare_genre",
            f"Passage: {r['input']}\nIs this passage from a comedy, a history or a tragedy?\nAnswer:",
            r["target"],
            r["group"],
            r["input"],
            GENRES,
        )
        for r in shakespeare_genre()
    ]


def _language_id(name: str, languages: Sequence[str]) -> Callable[[], list[dict[str, Any]]]:
    def build() -> list[dict[str, Any]]:
        from common.data.math import gsm_parallel

        names = [LANGUAGE_NAMES[code] for code in languages]
        question = f"Which language is this problem written in: {', '.join(names[:-1])} or {names[-1]}?"
        return [
            _record(
                name,
                f"Problem: {r['question']}\n{question}\nAnswer:",
                LANGUAGE_NAMES[r["language"]],
                f"gsm{r['template_id']}",
                r["question"],
                names,
            )
            for r in gsm_parallel(list(languages))
        ]

    return build


def _champ_category() -> list[dict[str, Any]]:
    from common.data.text_tasks import CHAMP_CATEGORIES, champ_category

    return [
        _record(
            "champ_category",
            f"Problem: {r['input']}\nIs this problem about combinatorics, inequality, number theory, "
            "polynomial or sequence?\nAnswer:",
            r["target"],
            r["group"],
            r["input"],
            CHAMP_CATEGORIES.values(),
        )
        for r in champ_category()
    ]


def _breast_cancer() -> list[dict[str, Any]]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = list(data.target_names)  # ['malignant', 'benign']
    out = []
    for i, (row, y) in enumerate(zip(data.data, data.target)):
        features = ", ".join(f"{data.feature_names[j]} {row[j]:.3g}" for j in range(CANCER_FEATURES))
        out.append(
            _record(
                "breast_cancer",
                f"Tumour measurements: {features}.\nIs this tumour malignant or benign?\nAnswer:",
                names[y],
                f"tumour{i}",
                features,
                names,
            )
        )
    return out


def stdlib_functions(packages: Iterable[str] = CODE_PACKAGES) -> list[dict[str, Any]]:
    """`def`s of the stdlib packages (3-30 lines, no dunder methods, each text once): name, package, file,
    text (dedented source)."""
    from common.data.code import stdlib_code

    wanted = set(packages)
    out, seen = [], set()
    for module in stdlib_code():
        if module["package"] not in wanted:
            continue
        source = module["text"]
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("__"):
                continue
            body = lines[node.lineno - 1 : node.end_lineno]
            if not 3 <= len(body) <= 30:
                continue
            indent = len(body[0]) - len(body[0].lstrip())
            text = "\n".join(line[indent:] for line in body)
            key = " ".join(text.split())
            if key in seen:  # the same function in two files would cross splits: keep the first
                continue
            seen.add(key)
            out.append(
                {"name": node.name, "package": module["package"], "file": module["path"], "text": text}
            )
    return out


def _code_package() -> list[dict[str, Any]]:
    choices = list(CODE_PACKAGES)
    question = (
        f"Which standard-library package is this function from: {', '.join(choices[:-1])} or {choices[-1]}?"
    )
    return [
        _record(
            "code_package",
            f"Code:\n{f['text']}\n{question}\nAnswer:",
            f["package"],
            f["file"],
            f["text"],
            choices,
        )
        for f in stdlib_functions()
    ]


def _code_name() -> list[dict[str, Any]]:
    out = []
    for f in stdlib_functions():
        masked = f["text"].replace(f["name"], "___")
        out.append(
            _record(
                "code_name",
                f"Code:\n{masked}\nWhat is the name of the function ___?\nAnswer:",
                f["name"],
                f["file"],
                f["text"],
            )
        )
    return out


def _gsm_solution() -> list[dict[str, Any]]:
    from common.data.math import gsm_originals

    return [
        _record(
            "gsm_solution",
            f"Problem: {r['question']}\nSolve the problem step by step.\nAnswer:",
            _first_words(r["answer"]),
            f"gsm{r['template_id']}",
            r["question"],
        )
        for r in gsm_originals("eng", include_ignored=True)
    ]


def _translate(name: str, languages: Sequence[str]) -> Callable[[], list[dict[str, Any]]]:
    def build() -> list[dict[str, Any]]:
        from common.data.math import gsm_originals

        english = {r["template_id"]: r["question"] for r in gsm_originals("eng", include_ignored=True)}
        out = []
        for code in languages:
            for r in gsm_originals(code, include_ignored=True):
                if r["template_id"] not in english:
                    continue
                out.append(
                    _record(
                        name,
                        f"{LANGUAGE_NAMES[code]}: {r['question']}\nTranslate the problem into English.\nAnswer:",
                        _first_words(english[r["template_id"]]),
                        f"gsm{r['template_id']}",
                        r["question"],
                    )
                )
        return out

    return build


TASKS: dict[str, Task] = {
    "sentiment_airline": Task(_sentiment("airline")),
    "sentiment_apple": Task(_sentiment("apple")),
    "sentiment_coachella": Task(_sentiment("coachella")),
    "tweet_topic": Task(_tweet_topic),
    "shakespeare_genre": Task(_shakespeare_genre),
    "language_id_a": Task(_language_id("language_id_a", LANGUAGES_A)),
    "language_id_b": Task(_language_id("language_id_b", LANGUAGES_B)),
    "champ_category": Task(_champ_category),
    "breast_cancer": Task(_breast_cancer),
    "code_package": Task(_code_package),
    "code_name": Task(_code_name),
    "gsm_solution": Task(_gsm_solution),
    "translate_to_english": Task(_translate("translate_to_english", TRANSLATE_SEEN)),
    # held out: never trained on
    "language_id_union": Task(
        _language_id("language_id_union", LANGUAGES_A + LANGUAGES_B),
        held_out=True,
        note="needs both language-ID experts",
    ),
    "sentiment_deflategate": Task(
        _sentiment("deflategate"), held_out=True, note="close to the sentiment experts"
    ),
    "sentiment_self_driving": Task(
        _sentiment("self-driving"), held_out=True, note="close to the sentiment experts"
    ),
    "translate_unseen": Task(
        _translate("translate_unseen", TRANSLATE_UNSEEN),
        held_out=True,
        note="close to the translation expert",
    ),
}
LIBRARY = tuple(name for name, t in TASKS.items() if not t.held_out)
HELD_OUT = tuple(name for name, t in TASKS.items() if t.held_out)


def split_of(group: str, seed: int = SPLIT_SEED, fractions: Mapping[str, float] = FRACTIONS) -> str:
    """The split of a group: a hash of (seed, group) placed on [0, 1), the same in every task."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return name
    return list(fractions)[-1]


def task_splits(
    name: str,
    sizes: Mapping[str, int],
    *,
    seed: int = SPLIT_SEED,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """A task's records by split, each split shuffled by `seed` and cut to `sizes[split]` (0 = all).

    Classification tasks are cut with the label mix of the whole split (stratified), so a small test
    set keeps every class.
    """
    rows = records if records is not None else lookup(TASKS, name, "zoo task").build()
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in FRACTIONS}
    for r in rows:
        by_split[split_of(r["group"], seed)].append(r)
    out = {}
    for split, items in by_split.items():
        rng = random.Random(f"{seed}:{name}:{split}")
        rng.shuffle(items)
        n = sizes.get(split, 0)
        out[split] = _stratified_take(items, n) if n else items
    return out


def _stratified_take(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first `n` items in an order that interleaves the labels in proportion (shuffled order kept)."""
    if n >= len(items):
        return items
    by_label: dict[int, list[dict[str, Any]]] = {}
    for r in items:
        by_label.setdefault(r["label"], []).append(r)
    # Give each label its share of n (at least one while room remains), by largest remainder.
    shares = {y: n * len(rs) / len(items) for y, rs in by_label.items()}
    counts = {y: min(len(by_label[y]), max(1, int(s))) for y, s in shares.items()}
    for y in sorted(shares, key=lambda y: -(shares[y] - int(shares[y]))):
        if sum(counts.values()) >= n:
            break
        if counts[y] < len(by_label[y]):
            counts[y] += 1
    while sum(counts.values()) > n:
        counts[max(counts, key=counts.get)] -= 1
    keep = {id(r) for y, rs in by_label.items() for r in rs[: counts[y]]}
    return [r for r in items if id(r) in keep]


def leak_report(splits: Mapping[str, Mapping[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Every evaluated (validation/test) input of any task that is also a training input of a library
    task, after normalising case and whitespace; and groups found in two splits. Both must be empty."""

    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    train_inputs = {
        norm(r["input"]): task
        for task, s in splits.items()
        if task in LIBRARY or not TASKS.get(task, Task(list)).held_out
        for r in s.get("train", [])
    }
    leaks = [
        {"task": task, "split": split, "train_task": train_inputs[norm(r["input"])], "input": r["input"][:80]}
        for task, s in splits.items()
        for split in ("validation", "test")
        for r in s.get(split, [])
        if norm(r["input"]) in train_inputs
    ]
    split_of_group: dict[str, str] = {}
    crossing = set()
    for s in splits.values():
        for split, rows in s.items():
            for r in rows:
                if split_of_group.setdefault(r["group"], split) != split:
                    crossing.add(r["group"])
    return {"text_leaks": leaks, "groups_in_two_splits": sorted(crossing)}
