"""The tiny held-out tasks: no text (and no GSM template or tweet) of any expert, labels as designed."""

from __future__ import annotations

import pytest

from projects.phatgoose import tasks as T


def test_fresh_tweet_split_and_carrier_by_hand():
    # tweet_key is 12 hex digits; one key in ten (value divisible by 10) is held out, alternating
    # validation / test by the next decimal digit
    assert T.fresh_tweet_split("000000000000") == "validation"  # 0
    assert T.fresh_tweet_split("00000000000a") == "test"  # 10
    assert T.fresh_tweet_split("000000000014") == "validation"  # 20
    assert T.fresh_tweet_split("000000000001") is None
    assert T.carrier_of("@JetBlue where is my bag") == "jetblue"
    assert T.carrier_of("@USAirways @AmericanAir merger again") is None  # two carriers: ambiguous
    assert T.carrier_of("flying today") is None


def test_tweet_topic_fresh_rows_are_seen_topic_tweets_in_the_new_wording():
    from common.data.text_tasks import tweet_key, tweet_topic_of

    fresh = T.load_task("TWEET_TOPIC_FRESH")
    assert sorted(fresh) == ["test", "validation"]
    for split, ds in fresh.items():
        assert len(ds) > 1000
        for r in ds.select(range(50)):
            assert r["choices"] == ["airline", "apple", "deflategate"]
            assert r["target"] == tweet_topic_of(r["input"]) == r["choices"][r["label"]]
            assert r["source"] == (
                f"Which topic is this tweet about: airline, apple or deflategate?\nTweet: {r['input']}"
            )
            assert T.fresh_tweet_split(tweet_key(r["input"])) == split


def test_language_id_union_labels_choices_and_templates():
    union = T.load_task("LANGUAGE_ID_UNION")
    languages = ["eng", "fra", "deu", "ita", "dan", "nld", "swe", "isl", "est", "rus"]
    a, b = T.load_task("LANGUAGE_ID_A"), T.load_task("LANGUAGE_ID_B")
    assert list(a["train"]["choices"][0]) + list(b["train"]["choices"][0]) == languages
    for split in ("validation", "test"):
        ds = union[split]
        assert all(c == languages for c in ds["choices"])
        assert all(languages[lab] == t for lab, t in zip(ds["label"], ds["target"]))
        # 2 new problems per (template, language), 10 templates per split: balanced over the union
        assert [ds["target"].count(lang) for lang in languages] == [20] * 10
        # only templates no language-ID expert trains on: exactly the experts' own split of that name
        assert set(ds["group"]) == set(a[split]["group"]) == set(T.load_task("LANGUAGE_ID_C")[split]["group"])
        for expert in ("LANGUAGE_ID_A", "LANGUAGE_ID_B", "LANGUAGE_ID_C"):
            assert not set(ds["group"]) & set(T.load_task(expert)["train"]["group"])
    # hand-checked: the first English test problem (template 13) and its prompt
    first = union["test"][0]
    assert (first["target"], first["label"], first["group"]) == ("eng", 0, "13")
    assert first["input"].startswith("Claire is an avid gardener.")
    assert first["source"] == f"Problem: {first['input']}\nWhich language is this problem written in?"


@pytest.mark.slow
def test_new_heldout_tasks_share_no_text_or_tweet_with_any_expert_task():
    held = ["LANGUAGE_ID_UNION", "TWEET_TOPIC_FRESH"]
    T.check_heldout_disjoint(list(T.TINY_TASKS), held)
    fresh_groups = {g for ds in T.load_task("TWEET_TOPIC_FRESH").values() for g in ds["group"]}
    for name in T.TINY_TASKS:
        if name.startswith("TWEET_"):
            groups = {g for ds in T.load_task(name).values() for g in ds["group"]}
            assert not groups & fresh_groups, name
