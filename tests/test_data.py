import re

import pytest
from datasets import Dataset

from common.data import (
    DATASETS,
    as_multiple_choice,
    as_text_to_text,
    assert_disjoint_text,
    calculator_program,
    gsm_hard,
    gsm_originals,
    gsm_variants,
    load,
    load_split,
    run_program,
    split_by_group,
    split_random,
    stdlib_code,
)
from common.data.hub import GLUE_PROMPTS, HubOffline, glue_record, hub_offline
from common.data.splits import allocate
from common.data.text_tasks import PLAY_GENRES, TOPICS, shakespeare_passages, tweet_topic_of

TASK_COLUMNS = ["task", "input", "source", "target", "choices", "label", "group"]
GSM_COLUMNS = ["template_id", "id_orig", "language", "question", "answer", "final_answer"]
# name -> (small kwargs, expected columns)
OFFLINE = {
    "stdlib_code": ({"max_files": 40}, ["text", "path", "package"]),
    "humaneval": ({}, ["task_id", "prompt", "canonical_solution", "test", "entry_point"]),
    "gsm_originals": ({}, GSM_COLUMNS),
    "gsm_variants": ({"n_per_template": 2}, [*GSM_COLUMNS[:2], "variant", *GSM_COLUMNS[2:]]),
    "gsm_hard": ({"n_per_template": 1}, ["template_id", "input", "code", "target", "answer"]),
    "champ": ({}, ["problem_id", "problem", "solution", "answer", "category"]),
    "shakespeare": ({"lines_per_passage": 40}, ["text", "play", "genre"]),
    **{f"tweet_sentiment_{t.replace('-', '_')}": ({}, TASK_COLUMNS) for t in TOPICS},
    "tweet_topic": ({}, TASK_COLUMNS),
    "shakespeare_genre": ({"lines_per_passage": 40}, TASK_COLUMNS),
    "gsm_language_id": ({"languages": ["eng", "fra", "deu"]}, TASK_COLUMNS),
    "champ_category": ({}, TASK_COLUMNS),
}


def _groups(dd, column):
    return {name: set(split[column][:]) for name, split in dd.items()}


def test_every_offline_dataset_is_registered_and_tested():
    # the image tasks (common/data/images.py) are tested in test_data_images.py
    assert set(OFFLINE) == {name for name, fn in DATASETS.items() if getattr(fn, "func", None) is load_split}


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_loader_columns_and_splits(name):
    kwargs, columns = OFFLINE[name]
    splits, record = load(name, **kwargs)
    expected_splits = ["test"] if name == "humaneval" else ["train", "validation", "test"]
    assert list(splits) == expected_splits
    for split in splits.values():
        assert split.column_names == columns and len(split) > 0
    assert record["sizes"] == {k: len(v) for k, v in splits.items()}
    assert record["seed"] == 0 and kwargs.items() <= record["build_kwargs"].items()
    if "label" in columns:  # task records: the label indexes the target in the choices
        row = splits["train"][0]
        assert row["choices"][row["label"]] == row["target"] and row["input"] in row["source"]


def test_same_seed_same_splits_other_seed_other_splits():
    a, rec_a = load("shakespeare_genre", lines_per_passage=40, seed=3)
    b, rec_b = load("shakespeare_genre", lines_per_passage=40, seed=3)
    _, rec_c = load("shakespeare_genre", lines_per_passage=40, seed=4)
    assert rec_a == rec_b and all(a[k]["input"][:] == b[k]["input"][:] for k in a)
    assert rec_a["splits"]["test"]["groups"] != rec_c["splits"]["test"]["groups"]
    ds = Dataset.from_dict({"x": list(range(50))})
    (r1, m1), (r2, m2), (r3, m3) = (
        split_random(ds, seed=1),
        split_random(ds, seed=1),
        split_random(ds, seed=2),
    )
    assert m1 == m2 and r1["test"]["x"][:] == r2["test"]["x"][:]
    assert r1["test"]["x"][:] != r3["test"]["x"][:] and m1 != m3
    assert sorted(x for s in r1.values() for x in s["x"][:]) == list(range(50))


def test_split_by_group_keeps_groups_whole_and_records_them():
    # 30 groups of uneven sizes, each inside one of two strata
    groups = [g for g in range(30) for _ in range(1 + g % 4)]
    ds = Dataset.from_dict({"g": groups, "kind": [g % 2 for g in groups], "i": list(range(len(groups)))})
    splits, record = split_by_group(ds, "g", {"train": 0.6, "validation": 0.2, "test": 0.2}, seed=0)
    per_split = _groups(splits, "g")
    assert not (per_split["train"] & per_split["validation"] or per_split["train"] & per_split["test"])
    assert not per_split["validation"] & per_split["test"]
    assert sorted(i for s in splits.values() for i in s["i"][:]) == list(range(len(groups)))
    assert {k: len(v) for k, v in per_split.items()} == {"train": 18, "validation": 6, "test": 6}
    assert {k: set(v["groups"]) for k, v in record["splits"].items()} == per_split
    strat, _ = split_by_group(ds, "g", seed=0, stratify_column="kind")
    assert all(set(s["kind"][:]) == {0, 1} for s in strat.values())  # every split sees both strata
    with pytest.raises(ValueError, match="spans strata"):
        split_by_group(ds, "kind", stratify_column="g")


def test_allocate_and_bad_fractions():
    assert allocate(10, {"train": 0.8, "validation": 0.1, "test": 0.1}) == {
        "train": 8,
        "validation": 1,
        "test": 1,
    }
    assert allocate(3, {"train": 0.9, "validation": 0.05, "test": 0.05}) == {
        "train": 1,
        "validation": 1,
        "test": 1,
    }
    with pytest.raises(ValueError, match="cannot split 2 groups into 3"):
        allocate(2, {"train": 0.8, "validation": 0.1, "test": 0.1})
    with pytest.raises(ValueError, match="sum to 1"):
        split_random(Dataset.from_dict({"x": [1, 2]}), {"train": 0.5, "test": 0.4})


def test_gsm_splits_are_disjoint_by_template_and_shared_across_gsm_sets():
    variants, _ = load("gsm_variants", n_per_template=2, seed=0)
    per_split = _groups(variants, "template_id")
    assert sum(len(v) for v in per_split.values()) == len(set.union(*per_split.values()))
    # every GSM set (and language ID, whose groups are template ids as strings) uses one assignment
    language_id, _ = load("gsm_language_id", languages=["eng", "fra"], seed=0)
    originals, _ = load("gsm_originals", seed=0)
    for name in per_split:
        assert {int(g) for g in language_id[name]["group"][:]} == set(originals[name]["template_id"][:])
        assert per_split[name] <= set(originals[name]["template_id"][:])
    # the same problem in French is in the same split as in English
    for split in language_id.values():
        by_language = {"eng": set(), "fra": set()}
        for group, language in zip(split["group"][:], split["target"][:]):
            by_language[language].add(group)
        assert by_language["eng"] == by_language["fra"]


def test_gsm_variants_meet_the_template_conditions():
    # template 1: "It takes {t} minutes to cover every {d} miles ... the city is {y} miles across",
    # condition is_int(y/d), answer y//d*t
    ds = gsm_variants(n_per_template=6, seed=5, templates=[1])
    assert len(ds) == 6 and len(set(ds["question"][:])) == 6
    for q, a in zip(ds["question"][:], ds["final_answer"][:]):
        t, d, y = map(
            int, re.search(r"takes (\d+) minutes to cover every (\d+) miles.* is (\d+) miles", q).groups()
        )
        assert y % d == 0 and int(a) == y // d * t
    assert gsm_variants(n_per_template=6, seed=6, templates=[1])["question"][:] != ds["question"][:]


def test_gsm_hard_programs_execute_to_the_answer():
    ds = gsm_hard(n_per_template=1, templates=range(30))
    assert len(ds) >= 20
    for code, target in zip(ds["code"][:], ds["target"][:]):
        assert code.startswith("def solution():") and run_program(code) == pytest.approx(target, abs=1e-6)
    fog = gsm_originals()[1]  # 42/3 = 14 intervals, 14*10 = 140 minutes
    assert calculator_program(fog["question"], fog["answer"]) == (
        "def solution():\n    step_1 = 42/3\n    step_2 = step_1*10\n    result = step_2\n    return result\n"
    )
    shark = gsm_originals()[0]  # its last step (1 foot / 10 feet * 100% = 10%) is prose, not <<...>>
    assert calculator_program(shark["question"], shark["answer"]) is None


@pytest.mark.parametrize(
    "code",
    [
        "import os",
        "def solution():\n    return __import__('os').getcwd()",
        "def solution():\n    return (1).__class__",
        "def solution():\n    return 'a' * 3",
        "def solution():\n    return 9 ** 9 ** 9",
        "x = 1",
    ],
)
def test_run_program_accepts_only_arithmetic(code):
    with pytest.raises(ValueError, match="calculator program"):
        run_program(code)


def test_assert_disjoint_text_catches_a_leak():
    champ_tasks, _ = load("champ_category")
    language_id, _ = load("gsm_language_id", languages=["eng"])
    assert_disjoint_text(champ_tasks, language_id)  # held-out vs expert tasks: no shared text
    # a constructed leak: one expert training problem, re-spaced and upper-cased, among the held-out ones
    question = language_id["train"]["input"][0]
    held_out = [*champ_tasks["test"]["input"][:], "  " + question.upper().replace(" ", "\n ")]
    with pytest.raises(AssertionError, match="1 texts appear in both"):
        assert_disjoint_text(language_id["train"], held_out)
    # by construction the topic task reuses the sentiment tasks' tweets: not a valid held-out pair
    topic, _ = load("tweet_topic")
    coachella, _ = load("tweet_sentiment_coachella")
    with pytest.raises(AssertionError, match="appear in both"):
        assert_disjoint_text(coachella["train"], topic["test"])


def test_task_views():
    splits, _ = load("champ_category")
    mc, t2t = as_multiple_choice(splits), as_text_to_text(splits["test"])
    assert mc["train"].column_names == ["task", "question", "choices", "label"]
    assert t2t.column_names == ["task", "source", "target"]
    row = mc["test"][0]
    assert row["choices"][row["label"]] == splits["test"][0]["target"] and len(row["choices"]) == 5


def test_tweet_topics_and_play_genres():
    assert tweet_topic_of("@united lost my bag again") == "airline"
    assert tweet_topic_of("Google's driverless car at #Coachella") is None  # two topics: ambiguous
    assert tweet_topic_of("allergy season, need claritin") is None
    from common.data.assets import package_dir

    plays = {p.name.removesuffix("_gut.txt") for p in (package_dir("shksprdata") / "texts").glob("*_gut.txt")}
    poems = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
    assert set(PLAY_GENRES) == plays - poems
    splits, _ = load("shakespeare", lines_per_passage=40)
    assert all(set(s["genre"][:]) == {"comedy", "history", "tragedy"} for s in splits.values())
    p = shakespeare_passages(40)
    assert all(len(t.splitlines()) == 40 for t in p["text"][:5])


def test_stdlib_code_excludes_tests_and_is_sorted():
    ds = stdlib_code(max_files=200)
    paths = ds["path"][:]
    assert len(ds) == 200 and paths == sorted(paths)
    assert not any(set(p.split("/")) & {"test", "tests", "idle_test", "site-packages"} for p in paths)
    assert all(p.endswith(".py") for p in paths)


def test_hub_loaders_fail_fast_offline(monkeypatch):
    hub_names = [name for name in DATASETS if "/" in name]
    assert len(hub_names) == 15 and hub_offline()  # conftest sets HF_*_OFFLINE=1
    args = {
        "bigscience/P3": {"config": "cosmos_qa_context_answer_to_question"},
        "nyu-mll/glue": {"task": "rte"},
    }
    for name in hub_names:
        with pytest.raises(
            HubOffline,
            match=f"^{re.escape(name)} is on the Hugging Face Hub and this machine is offline; the offline equivalent is ",
        ):
            load(name, **args.get(name, {}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hub_offline()
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    assert not hub_offline()


def test_glue_records_use_the_papers_prompts():
    cola = glue_record("cola", {"sentence": "The cat sat.", "label": 1, "idx": 0})
    assert cola["source"].startswith(
        'Indicate if the following sentence is grammatically correct or not: "The cat sat."'
    )
    assert (cola["target"], cola["choices"][cola["label"]]) == ("acceptable", "acceptable")
    mnli = glue_record("mnli", {"premise": "p", "hypothesis": "h", "label": 2, "idx": 0})
    assert mnli["target"] == "contradiction"
    assert (
        glue_record("stsb", {"sentence1": "a", "sentence2": "b", "label": 3.8, "idx": 0})["target"] == "3.8"
    )
    assert glue_record("rte", {"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0})["target"] == ""
    assert sorted(GLUE_PROMPTS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


def test_unknown_dataset_names_the_close_match():
    with pytest.raises(KeyError, match="Did you mean 'tweet_sentiment_airline'"):
        load("tweet_sentimnt_airline")
