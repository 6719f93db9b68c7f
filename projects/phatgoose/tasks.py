"""The datasets, by the original's gin names (`-dataset P3SOCIALIQA`, `D/BBNAVIGATE/EVAL`).

Tiny scale (offline): one expert per offline text task, and held-out tasks sharing no text with any
expert's data (checked by `check_heldout_disjoint`):
- LANGUAGE_ID_UNION: language ID over the union of the two experts' disjoint language sets, on new
  GSM problems (seeded variants) of templates no expert trained on (the language-ID validation / test
  templates), so each input needs the one expert that knows its language;
- TWEET_TOPIC_FRESH: the topic of tweets on the seen topics that no expert saw (one tweet in ten,
  by `tweet_key`, is kept out of every tweet expert's data), asked in a new wording;
- TWEET_SENTIMENT_COACHELLA / _SELF_DRIVING: sentiment of tweets on topics no expert saw (the hard
  case: no tiny expert learns tweet sentiment).
Paper scale (`paper_tasks`): the P3 training sets and the held-out suites from the hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, partial
from typing import Any

from datasets import Dataset, DatasetDict

from common.data import assert_disjoint_text, gsm_parallel, gsm_variants, load, split_by_group
from common.data.text_tasks import PROMPTS, TOPIC_KEYWORDS, TOPICS, tweet_key, tweets
from common.registry import lookup
from common.tiny_world import PRETRAIN_SPLIT_SEED
from projects.phatgoose.paper_tasks import PAPER_DATASETS

HELDOUT_TOPICS = ("coachella", "self-driving")
SEEN_TOPICS = tuple(t for t in TOPICS if t not in HELDOUT_TOPICS)
# Language ID sets: languages whose 100 GSM templates all have a symbolic form (so new problems can be
# drawn for the held-out union), Latin script (the tiny tokenizer maps other scripts to <unk>) except
# Russian; Norwegian Bokmal is left out as nearly Danish. Set C (originals only) is a third expert.
LANGUAGES_A = ("eng", "fra", "deu", "ita", "dan")
LANGUAGES_B = ("nld", "swe", "isl", "est", "rus")
LANGUAGES_C = ("spa", "por", "pol", "ces", "fin")
# Airline tweets are replies to one carrier's account: the @-handle -> the carrier (answer choice).
CARRIERS = dict(
    zip(
        TOPIC_KEYWORDS["airline"],
        ("united", "us airways", "american", "southwest", "jetblue", "virgin america"),
    )
)
FRESH_TWEETS_ONE_IN = 10  # one seen-topic tweet in ten (by tweet_key) is held out of every expert's data
FRESH_TOPIC_PROMPT = "Which topic is this tweet about: airline, apple or deflategate?\nTweet: {input}"
CARRIER_PROMPT = (
    "Tweet: {input}\nWhich airline is this tweet to: united, us airways, american, southwest, jetblue "
    "or virgin america?"
)
UNION_VARIANTS_PER_TEMPLATE = 2  # new problems per (template, language) in LANGUAGE_ID_UNION
UNION_VARIANT_SEED = 0


def _tweets_on(topics: Sequence[str]) -> list[tuple[str, str]]:
    """(text, topic) of the tweets on one of `topics`."""
    t = tweets()
    return [(x, topic) for x, topic in zip(t["text"], t["topic"]) if topic in topics]


def fresh_tweet_split(group: str) -> str | None:
    """'validation' / 'test' for a tweet (by its `tweet_key`) held out of every expert, else None."""
    h = int(group, 16)
    if h % FRESH_TWEETS_ONE_IN:
        return None
    return "validation" if (h // FRESH_TWEETS_ONE_IN) % 2 == 0 else "test"


def _without_fresh_tweets(splits: DatasetDict) -> DatasetDict:
    """Every split minus the held-out fresh tweets (`fresh_tweet_split`)."""
    return DatasetDict(
        {k: v.filter(lambda r: fresh_tweet_split(r["group"]) is None) for k, v in splits.items()}
    )


def _records(
    task: str,
    prompt: str,
    inputs: Sequence[str],
    targets: Sequence[str],
    choices: Sequence[str],
    groups: Sequence[str],
) -> Dataset:
    """Uniform task records (as `common.data.text_tasks.records`) with this project's own prompt."""
    choices = list(choices)
    return Dataset.from_dict(
        {
            "task": [task] * len(inputs),
            "input": list(inputs),
            "source": [prompt.format(input=x) for x in inputs],
            "target": list(targets),
            "choices": [choices] * len(inputs),
            "label": [choices.index(t) for t in targets],
            "group": [str(g) for g in groups],
        }
    )


def _tweet_topic(keep: Sequence[str]) -> DatasetDict:
    """The tweet topic task restricted to the tweets on `keep` (answer choices stay all five topics),
    minus the fresh held-out tweets."""
    splits, _ = load("tweet_topic", seed=PRETRAIN_SPLIT_SEED)
    return _without_fresh_tweets(
        DatasetDict({k: v.filter(lambda r: r["target"] in keep) for k, v in splits.items()})
    )


def _named(name: str, **kwargs: Any) -> DatasetDict:
    return load(name, seed=PRETRAIN_SPLIT_SEED, **kwargs)[0]


def _tweets_kept(name: str) -> DatasetDict:
    """A tweet task on seen topics, minus the fresh held-out tweets."""
    return _without_fresh_tweets(_named(name))


def carrier_of(text: str) -> str | None:
    """The one carrier whose @-handle an airline tweet contains; None for several."""
    lowered = text.casefold()
    hits = [c for handle, c in CARRIERS.items() if handle in lowered]
    return hits[0] if len(hits) == 1 else None


def _tweet_carrier() -> DatasetDict:
    """Airline tweet -> the carrier it is addressed to (six choices), split by tweet, minus fresh tweets."""
    rows = [(x, c) for x, _ in _tweets_on(["airline"]) if (c := carrier_of(x)) is not None]
    data = _records(
        "tweet_carrier",
        CARRIER_PROMPT,
        [x for x, _ in rows],
        [c for _, c in rows],
        list(CARRIERS.values()),
        [tweet_key(x) for x, _ in rows],
    )
    return _without_fresh_tweets(split_by_group(data, "group", seed=PRETRAIN_SPLIT_SEED)[0])


def _tweet_topic_fresh() -> DatasetDict:
    """The held-out fresh tweets on the seen topics (validation and test), in `FRESH_TOPIC_PROMPT`'s
    wording, choices the three seen topics."""
    by_split: dict[str, list[tuple[str, str]]] = {"validation": [], "test": []}
    for x, topic in _tweets_on(SEEN_TOPICS):
        if (split := fresh_tweet_split(tweet_key(x))) is not None:
            by_split[split].append((x, topic))
    return DatasetDict(
        {
            k: _records(
                "tweet_topic_fresh",
                FRESH_TOPIC_PROMPT,
                [x for x, _ in rows],
                [topic for _, topic in rows],
                SEEN_TOPICS,
                [tweet_key(x) for x, _ in rows],
            )
            for k, rows in by_split.items()
        }
    )


def _language_id_union() -> DatasetDict:
    """Language ID over LANGUAGES_A + LANGUAGES_B on new GSM problems (`gsm_variants`) of the language-ID
    validation / test templates (no expert trains on them), each split from its own templates; a variant
    that happens to equal an original problem is dropped."""
    languages = LANGUAGES_A + LANGUAGES_B
    templates = {
        k: sorted({int(g) for g in v["group"]})
        for k, v in _named("gsm_language_id", languages=languages).items()
        if k != "train"
    }
    originals = {" ".join(q.split()) for q in gsm_parallel(languages)["question"]}
    out = {}
    for split, ids in templates.items():
        inputs, targets, groups = [], [], []
        for lang in languages:
            v = gsm_variants(UNION_VARIANTS_PER_TEMPLATE, UNION_VARIANT_SEED, lang, ids)
            for q, tid in zip(v["question"], v["template_id"]):
                if " ".join(q.split()) not in originals:
                    inputs.append(q)
                    targets.append(lang)
                    groups.append(tid)
        out[split] = _records(
            "language_id_union", PROMPTS["gsm_language_id"], inputs, targets, languages, groups
        )
    return DatasetDict(out)


# Gin dataset name -> builder of a DatasetDict of uniform records (source, target, choices, label, input).
TINY_TASKS = {
    "TWEET_SENTIMENT_AIRLINE": partial(_tweets_kept, "tweet_sentiment_airline"),
    "TWEET_SENTIMENT_APPLE": partial(_tweets_kept, "tweet_sentiment_apple"),
    "TWEET_SENTIMENT_DEFLATEGATE": partial(_tweets_kept, "tweet_sentiment_deflategate"),
    "TWEET_TOPIC_SEEN": partial(_tweet_topic, SEEN_TOPICS),
    "TWEET_CARRIER": _tweet_carrier,
    "SHAKESPEARE_GENRE": partial(_named, "shakespeare_genre"),
    "LANGUAGE_ID_A": partial(_named, "gsm_language_id", languages=LANGUAGES_A),
    "LANGUAGE_ID_B": partial(_named, "gsm_language_id", languages=LANGUAGES_B),
    "LANGUAGE_ID_C": partial(_named, "gsm_language_id", languages=LANGUAGES_C),
    "CHAMP_CATEGORY": partial(_named, "champ_category"),
}
# The tiny library (8 experts), chosen on validation (README, "Choosing the tiny experts"): the
# airline and apple sentiment experts, constant predictors, are replaced by the learnable TWEET_CARRIER
# and LANGUAGE_ID_C; deflategate sentiment (the one sentiment expert) and Shakespeare genre stay.
TINY_EXPERTS = {
    k: TINY_TASKS[k]
    for k in (
        "TWEET_CARRIER",
        "TWEET_SENTIMENT_DEFLATEGATE",
        "TWEET_TOPIC_SEEN",
        "SHAKESPEARE_GENRE",
        "LANGUAGE_ID_A",
        "LANGUAGE_ID_B",
        "LANGUAGE_ID_C",
        "CHAMP_CATEGORY",
    )
}
TINY_HELDOUT = {
    "LANGUAGE_ID_UNION": _language_id_union,
    "TWEET_TOPIC_FRESH": _tweet_topic_fresh,
    "TWEET_SENTIMENT_COACHELLA": partial(_named, "tweet_sentiment_coachella"),
    "TWEET_SENTIMENT_SELF_DRIVING": partial(_named, "tweet_sentiment_self_driving"),
    "TWEET_TOPIC_UNSEEN": partial(_tweet_topic, HELDOUT_TOPICS),
}
DATASETS = {**TINY_TASKS, **TINY_HELDOUT, **PAPER_DATASETS}
SETTINGS = {"Full": list(TINY_EXPERTS), "All": list(TINY_EXPERTS)}  # -dataset_setting of retriever.sh


def dataset_name(gin_name: str) -> str:
    """'D/TWEET_TOPIC_SEEN/EVAL' or 'TWEET_TOPIC_SEEN' -> 'TWEET_TOPIC_SEEN'; 'D/P3ANLI/R1/EVAL' ->
    'P3ANLI/R1'; 'FLAN2021BOOLQ/ZS' stays."""
    parts = [p for p in gin_name.split("/") if p not in ("D", "EVAL", "TRAIN", "")]
    if not parts:
        raise ValueError(f"cannot read a dataset name from {gin_name!r} (expected D/<NAME>/EVAL or <NAME>)")
    return "/".join(parts).upper()


@lru_cache(maxsize=32)
def load_task(gin_name: str) -> DatasetDict:
    """Train/validation/test splits of one dataset (split seed 0: seeds vary training, never splits)."""
    return lookup(DATASETS, dataset_name(gin_name), "dataset")()


def subsample(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """At most n rows, a fixed random subset."""
    return ds if n is None or len(ds) <= n else ds.shuffle(seed=seed).select(range(n))


def check_heldout_disjoint(experts: Sequence[str], heldout: Sequence[str]) -> None:
    """Raise if any held-out text (any split) appears in any expert's data (any split): a leak."""
    held = {h: load_task(h) for h in heldout}
    for e in experts:
        data = load_task(e)
        for h, hd in held.items():
            try:
                assert_disjoint_text(data, hd)
            except AssertionError as err:
                raise AssertionError(f"held-out {h} shares text with expert {e}: {err}") from None
