"""Paper-scale datasets by the original's gin names, and its expert settings (needs the hub).

Expert settings (`run_concatenate.datasets`, `-dataset_setting`, `import_rthree.datasets`): the order of
the original's `scripts/concatenate.py` dicts, which is expert i's index in a concatenated or released
(`r-three/*`) checkpoint: P3 (36), FLAN2021 (36), NIv2 (75), "add1" (19); "Full" is all 166.

Held-out suites (`colm/datasets/p3_t5xl.gin`, `colm/datasets/bigbench.gin`):
- T0 held-out (11): RTE, HellaSwag, COPA, WiC, WinoGrande, CB, StoryCloze, ANLI R1/R2/R3, WSC, scored as
  the original's eval gin (`include_templates="original"`): only promptsource's original-task templates,
  round robin (example j with template j mod T, in config-name order). `include_templates="all"` scores
  every template of its `bigscience/P3` configs, pooled (our earlier default);
- BIG-bench Hard (22) and BIG-bench Lite (17): `tasksource/bigbench` ("train_validation": train and
  validation together) or, for three BBH tasks, `lukaemon/bbh` (test), as the original's gin.
Generative BIG-bench tasks have no answer choices and are scored by exact match of greedy generation
against any reference; multiple-choice ones count any correct choice (`correct`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

P3_EXPERTS = (
    "P3AGNEWS",
    "P3AMAZONPOLARITY",
    "P3COSMOSQA",
    "P3SAMSUM",
    "P3QUARTZ",
    "P3ROPES",
    "P3WIKIBIO",
    "P3PAWS",
    "P3WIKIQA",
    "P3SOCIALIQA",
    "P3QASC",
    "P3QUAIL",
    "P3DREAM",
    "P3WIQA",
    "P3QUAREL",
    "P3SCIQ",
    "P3QUOREF",
    "P3DUORC",
    "P3ROTTENTOMATOES",
    "P3YELP",
    "P3COMMONGEN",
    "P3GIGAWORD",
    "P3XSUM",
    "P3MRPC",
    "P3QQP",
    "P3COMMONSENSEQA",
    "P3COSE",
    "P3WIKIHOP",
    "P3HOTPOTQA",
    "P3APPREVIEWS",
    "P3TREC",
    "P3MULTINEWS",
    "P3IMDB",
    "P3ADVERSARIALQA",
    "P3CNNDAILYMAIL",
    "P3DBPEDIA14",
)
FLAN2021_EXPERTS = tuple(
    f"FLAN2021{t}/ZS"
    for t in (
        "AI2ARCEASY",
        "AI2ARCCHALLENGE",
        "ALGEBRALINEAR1D",
        "BOOLQ",
        "COQA",
        "DEFPRONOUNRESOLUTION",
        "DROP",
        "FIXPUNCT",
        "GEMDART",
        "GEME2ENLG",
        "GEMWEBNLGEN",
        "GEMWIKILINGUAEN",
        "GLUESST2",
        "GLUECOLA",
        "GLUEMNLI",
        "GLUEQNLI",
        "GLUESTSB",
        "GLUEWNLI",
        "LAMBADA",
        "NATURALQUESTIONSOPEN",
        "NEWSROOM",
        "OPENBOOKQA",
        "OPINIONABSTRACTSIDEBATE",
        "OPINIONABSTRACTSROTTENTOMATOES",
        "PARACRAWLENES",
        "PIQA",
        "QUAC",
        "SENTIMENT140",
        "SNLI",
        "SQUAD",
        "SUPERGLUEMULTIRC",
        "SUPERGLUERECORD",
        "TRIVIAQA",
        "TRUECASE",
        "UNIFIEDQASCIENCEINST",
        "WORDSEGMENT",
    )
)
NIV2_EXPERTS = tuple(
    f"NIV2{t}/ZS"
    for t in (
        "TRANSLATION",
        "PROGRAMEXECUTION",
        "QUESTIONGENERATION",
        "SENTIMENTANALYSIS",
        "TEXTCATEGORIZATION",
        "TEXTMATCHING",
        "TOXICLANGUAGEDETECTION",
        "CAUSEEFFECTCLASSIFICATION",
        "INFORMATIONEXTRACTION",
        "TEXTUALENTAILMENT",
        "WRONGCANDIDATEGENERATION",
        "NAMEDENTITYRECOGNITION",
        "COMMONSENSECLASSIFICATION",
        "FILLINTHEBLANK",
        "TEXTCOMPLETION",
        "SENTENCECOMPOSITION",
        "TITLEGENERATION",
        "LANGUAGEIDENTIFICATION",
        "QUESTIONUNDERSTANDING",
        "SENTENCEPERTURBATION",
        "ANSWERABILITYCLASSIFICATION",
        "SUMMARIZATION",
        "COREFERENCERESOLUTION",
        "TEXTQUALITYEVALUATION",
        "TEXTTOCODE",
        "PARAPHRASING",
        "DIALOGUEGENERATION",
        "QUESTIONREWRITING",
        "WORDSEMANTICS",
        "POSTAGGING",
        "LINGUISTICPROBING",
        "STORYCOMPOSITION",
        "SPEAKERIDENTIFICATION",
        "WORDANALOGY",
        "DATATOTEXT",
        "STEREOTYPEDETECTION",
        "NEGOTIATIONSTRATEGYDETECTION",
        "DIALOGUEACTRECOGNITION",
        "GENDERCLASSIFICATION",
        "COHERENCECLASSIFICATION",
        "EXPLANATION",
        "ETHICSCLASSIFICATION",
        "WORDRELATIONCLASSIFICATION",
        "SENTENCEORDERING",
        "ANSWERVERIFICATION",
        "MATHEMATICS",
        "INTENTIDENTIFICATION",
        "KEYWORDTAGGING",
        "CODETOTEXT",
        "DIALOGUESTATETRACKING",
        "TEXTSIMPLIFICATION",
        "STANCEDETECTION",
        "FACTVERIFICATION",
        "GRAMMARERRORDETECTION",
        "SECTIONCLASSIFICATION",
        "NUMBERCONVERSION",
        "STYLETRANSFER",
        "SPEAKERRELATIONCLASSIFICATION",
        "IRONYDETECTION",
        "QUESTIONDECOMPOSITION",
        "OVERLAPEXTRACTION",
        "GRAMMARERRORCORRECTION",
        "SPELLINGERRORDETECTION",
        "ENTITYGENERATION",
        "SENTENCEEXPANSION",
        "DISCOURSECONNECTIVEIDENTIFICATION",
        "DISCOURSERELATIONCLASSIFICATION",
        "POEMGENERATION",
        "ENTITYRELATIONCLASSIFICATION",
        "PUNCTUATIONERRORDETECTION",
        "SPAMCLASSIFICATION",
        "PAPERREVIEW",
        "SENTENCECOMPRESSION",
        "PREPOSITIONPREDICTION",
        "MISC",
    )
)
ADD1_EXPERTS = (
    "P3WSCFIXED",
    "P3COPA",
    "P3HSWAG",
    "P3WIC",
    "P3RACEHIGH",
    "P3RACEMIDDLE",
    "P3WEBQUESTIONS",
    "DIALOGQRECC/ZS",
    "DIALOGWIKIDIALOG/ZS",
    "DIALOGQRECCII/ZS",
    "DIALOGWIKIDIALOGII/ZS",
    *(
        f"FLAN2021{t}/ZS"
        for t in (
            "AESLC",
            "WMT16TRANSLATECSEN",
            "WMT16TRANSLATEDEEN",
            "WMT16TRANSLATERUEN",
            "WMT16TRANSLATEFIEN",
            "WMT16TRANSLATEROEN",
            "WMT16TRANSLATETREN",
            "WMT14TRANSLATEFREN",
        )
    ),
)
PAPER_SETTINGS = {
    "P3": list(P3_EXPERTS),
    "Flanv2": list(FLAN2021_EXPERTS),
    "Niv2": list(NIV2_EXPERTS),
    "Add1": list(ADD1_EXPERTS),
    "All": [*P3_EXPERTS, *FLAN2021_EXPERTS, *NIV2_EXPERTS],
    "P3flanv2": [*P3_EXPERTS, *FLAN2021_EXPERTS],
    "Full": [*P3_EXPERTS, *FLAN2021_EXPERTS, *NIV2_EXPERTS, *ADD1_EXPERTS],
}

# Gin name -> (bigscience/P3 config prefix = the original's dataset_path joined by "_", eval split, suffix
# a config must end with). Training uses the "train" split of every template.
P3_SOURCES: dict[str, tuple[str, str, str]] = {
    "P3AGNEWS": ("ag_news", "test", ""),
    "P3AMAZONPOLARITY": ("amazon_polarity", "test", ""),
    "P3COSMOSQA": ("cosmos_qa", "validation", ""),
    "P3SAMSUM": ("samsum", "validation", ""),
    "P3QUARTZ": ("quartz", "validation", ""),
    "P3ROPES": ("ropes", "validation", ""),
    "P3WIKIBIO": ("wiki_bio", "val", ""),
    "P3PAWS": ("paws_labeled_final", "validation", ""),
    "P3WIKIQA": ("wiki_qa", "validation", ""),
    "P3SOCIALIQA": ("social_i_qa", "validation", ""),
    "P3QASC": ("qasc", "validation", ""),
    "P3QUAIL": ("quail", "validation", ""),
    "P3DREAM": ("dream", "validation", ""),
    "P3WIQA": ("wiqa", "validation", ""),
    "P3QUAREL": ("quarel", "validation", ""),
    "P3SCIQ": ("sciq", "validation", ""),
    "P3QUOREF": ("quoref", "validation", ""),
    "P3DUORC": ("duorc_ParaphraseRC", "validation", ""),
    "P3ROTTENTOMATOES": ("rotten_tomatoes", "validation", ""),
    "P3YELP": ("yelp_review_full", "test", ""),
    "P3COMMONGEN": ("common_gen", "validation", ""),
    "P3GIGAWORD": ("gigaword", "validation", ""),
    "P3XSUM": ("xsum", "validation", ""),
    "P3MRPC": ("glue_mrpc", "validation", ""),
    "P3QQP": ("glue_qqp", "validation", ""),
    "P3COMMONSENSEQA": ("commonsense_qa", "validation", ""),
    "P3COSE": ("cos_e_v1.11", "validation", ""),
    "P3WIKIHOP": ("wiki_hop_original", "validation", ""),
    "P3HOTPOTQA": ("hotpot_qa_fullwiki", "validation", ""),
    "P3APPREVIEWS": ("app_reviews", "train", ""),
    "P3TREC": ("trec", "test", ""),
    "P3MULTINEWS": ("multi_news", "validation", ""),
    "P3IMDB": ("imdb", "test", ""),
    "P3ADVERSARIALQA": ("adversarial_qa_adversarialQA", "validation", ""),
    "P3CNNDAILYMAIL": ("cnn_dailymail_3.0.0", "validation", ""),
    "P3DBPEDIA14": ("dbpedia_14", "test", ""),
    # T0 held-out
    "P3RTE": ("super_glue_rte", "validation", ""),
    "P3HSWAG": ("hellaswag", "validation", ""),
    "P3COPA": ("super_glue_copa", "validation", ""),
    "P3WIC": ("super_glue_wic", "validation", ""),
    "P3WINOGRANDE": ("winogrande_winogrande_xl", "validation", ""),
    "P3CB": ("super_glue_cb", "validation", ""),
    "P3STORYCLOZE": ("story_cloze_2016", "test", ""),
    "P3ANLI/R1": ("anli", "dev_r1", "_r1"),
    "P3ANLI/R2": ("anli", "dev_r2", "_r2"),
    "P3ANLI/R3": ("anli", "dev_r3", "_r3"),
    "P3WSCFIXED": ("super_glue_wsc.fixed", "validation", ""),
}
T0_HELDOUT = (
    "P3RTE",
    "P3HSWAG",
    "P3COPA",
    "P3WIC",
    "P3WINOGRANDE",
    "P3CB",
    "P3STORYCLOZE",
    "P3ANLI/R1",
    "P3ANLI/R2",
    "P3ANLI/R3",
    "P3WSCFIXED",
)

# The T0 held-out templates that are not original-task ones (promptsource's `original_task: false`, checked
# against its templates.yaml): the original evaluates with include_templates="original", so these are left out.
NOT_ORIGINAL_TASK = {
    "hellaswag": (
        "Topic without the ending answer",
        "Open-ended completion",
        "Topic of the context",
        "Appropriate continuation - Yes or No",
        "Open-ended start",
        "Reversed appropriate continuation - Yes or No",
        "how_ends",
    ),
    "winogrande_winogrande_xl": ("True or False",),
    "story_cloze_2016": ("Generate Ending",),
}
TEMPLATE_CHOICES = ("original", "all")


def _norm(name: str) -> str:
    # P3 config names spell a template with its non-alphanumerics as "_"
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def original_task_templates(prefix: str, suffix: str, configs: Sequence[str]) -> list[str]:
    """`configs` of one T0 held-out dataset without its non-original-task templates."""
    dropped = {_norm(t) for t in NOT_ORIGINAL_TASK.get(prefix, ())}
    keep = []
    for c in configs:
        template = c[len(prefix) + 1 : len(c) - len(suffix)] if suffix else c[len(prefix) + 1 :]
        if _norm(template) not in dropped:
            keep.append(c)
    return keep


# BIG-bench gin name -> (hub id, config); lukaemon/bbh is read on "test", tasksource on train+validation.
BBH_SOURCES: dict[str, tuple[str, str]] = {
    "BBBOOLEANEXPRESSIONS": ("lukaemon/bbh", "boolean_expressions"),
    "BBCAUSALJUDGEMENT": ("tasksource/bigbench", "causal_judgment"),
    "BBDATEUNDERSTANDING": ("tasksource/bigbench", "date_understanding"),
    "BBDISAMBIGUATIONQA": ("tasksource/bigbench", "disambiguation_qa"),
    "BBFORMALFALLACIES": ("tasksource/bigbench", "formal_fallacies_syllogisms_negation"),
    "BBGEOMETRICSHAPES": ("tasksource/bigbench", "geometric_shapes"),
    "BBHYPERBATON": ("tasksource/bigbench", "hyperbaton"),
    "BBLOGICALDEDUCTION": ("tasksource/bigbench", "logical_deduction"),
    "BBMOVIERECOMMENDATION": ("tasksource/bigbench", "movie_recommendation"),
    "BBMULTISTEPARITHMETICTWO": ("lukaemon/bbh", "multistep_arithmetic_two"),
    "BBNAVIGATE": ("tasksource/bigbench", "navigate"),
    "BBOBJECTCOUNTING": ("tasksource/bigbench", "object_counting"),
    "BBPENGUINSINATABLE": ("tasksource/bigbench", "penguins_in_a_table"),
    "BBREASONINGABOUTCOLOREDOBJECTS": ("tasksource/bigbench", "reasoning_about_colored_objects"),
    "BBRUINNAMES": ("tasksource/bigbench", "ruin_names"),
    "BBSALIENTTRANSLATIONERRORDETECTION": ("tasksource/bigbench", "salient_translation_error_detection"),
    "BBSNARKS": ("tasksource/bigbench", "snarks"),
    "BBSPORTSUNDERSTANDING": ("tasksource/bigbench", "sports_understanding"),
    "BBTEMPORALSEQUENCES": ("tasksource/bigbench", "temporal_sequences"),
    "BBTRACKINGSHUFFLEDOBJECTS": ("tasksource/bigbench", "tracking_shuffled_objects"),
    "BBWEBOFLIES": ("lukaemon/bbh", "web_of_lies"),
    "BBWORDSORTING": ("tasksource/bigbench", "word_sorting"),
}
# BIG-bench Lite's other tasks (formal fallacies and logical deduction are shared with BBH)
BBLITE_ONLY_SOURCES: dict[str, tuple[str, str]] = {
    "BBBBQLITEJSON": ("tasksource/bigbench", "bbq_lite_json"),
    "BBCONCEPTUALCOMBINATIONS": ("tasksource/bigbench", "conceptual_combinations"),
    "BBCONLANGTRANSLATION": ("tasksource/bigbench", "conlang_translation"),
    "BBHINDUKNOWLEDGE": ("tasksource/bigbench", "hindu_knowledge"),
    "BBKNOWNUNKNOWNS": ("tasksource/bigbench", "known_unknowns"),
    "BBLINGUISTICSPUZZLES": ("tasksource/bigbench", "linguistics_puzzles"),
    "BBLOGICGRIDPUZZLE": ("tasksource/bigbench", "logic_grid_puzzle"),
    "BBNOVELCONCEPTS": ("tasksource/bigbench", "novel_concepts"),
    "BBOPERATORS": ("tasksource/bigbench", "operators"),
    "BBPLAYDIALOGSAMEORDIFFERENT": ("tasksource/bigbench", "play_dialog_same_or_different"),
    "BBREPEATCOPYLOGIC": ("tasksource/bigbench", "repeat_copy_logic"),
    "BBSTRANGESTORIES": ("tasksource/bigbench", "strange_stories"),
    "BBSTRATEGYQA": ("tasksource/bigbench", "strategyqa"),
    "BBVITAMINCFACTVERIFICATION": ("tasksource/bigbench", "vitaminc_fact_verification"),
    "BBWINOWHY": ("tasksource/bigbench", "winowhy"),
}
BIGBENCH_SOURCES = {**BBH_SOURCES, **BBLITE_ONLY_SOURCES}
BBH = tuple(BBH_SOURCES)
BBLITE = (
    "BBBBQLITEJSON",
    "BBCONCEPTUALCOMBINATIONS",
    "BBCONLANGTRANSLATION",
    "BBFORMALFALLACIES",
    "BBHINDUKNOWLEDGE",
    "BBKNOWNUNKNOWNS",
    "BBLINGUISTICSPUZZLES",
    "BBLOGICGRIDPUZZLE",
    "BBLOGICALDEDUCTION",
    "BBNOVELCONCEPTS",
    "BBOPERATORS",
    "BBPLAYDIALOGSAMEORDIFFERENT",
    "BBREPEATCOPYLOGIC",
    "BBSTRANGESTORIES",
    "BBSTRATEGYQA",
    "BBVITAMINCFACTVERIFICATION",
    "BBWINOWHY",
)
_OFFLINE = "the tiny tasks (projects.phatgoose.tasks.TINY_TASKS / TINY_HELDOUT)"


def p3_templates(prefix: str, suffix: str = "", config_names: Sequence[str] | None = None) -> list[str]:
    """The bigscience/P3 configs of one dataset: `<prefix>_<template>[<suffix>]`, without the
    `_score_eval` variants (the same rows, one per answer choice)."""
    if config_names is None:
        from common.data.hub import config_names as hub_config_names

        config_names = hub_config_names("bigscience/P3", _OFFLINE)
    found = [
        c
        for c in config_names
        if c.startswith(prefix + "_") and not c.endswith("_score_eval") and c.endswith(suffix)
    ]
    if not found:
        raise ValueError(f"no bigscience/P3 config starts with {prefix + '_'!r} (and ends with {suffix!r})")
    return sorted(found)


def p3_dataset(
    name: str,
    load: Callable[[str], DatasetDict] | None = None,
    config_names: Sequence[str] | None = None,
    include_templates: str = "original",
) -> DatasetDict:
    """One P3 dataset: "train" pools every template, the gin's eval split is "test" and "validation"; a
    `template` column names the config. A T0 held-out dataset is evaluated as the original
    (`include_templates="original"`): its original-task templates, example j from template j mod T;
    "all" (and every other dataset) pools every template. `load` (default `common.data.hub.p3`) reads one
    config; `config_names` (default: the hub's list) are the configs to choose from."""
    from common.data import hub

    if include_templates not in TEMPLATE_CHOICES:
        raise ValueError(f"include_templates={include_templates!r}: choose one of {TEMPLATE_CHOICES}")
    prefix, eval_split, suffix = P3_SOURCES[name]
    load = load or (lambda config: hub.p3(config)[0])
    configs = p3_templates(prefix, suffix, config_names)
    round_robin = include_templates == "original" and name in T0_HELDOUT
    evaluated = original_task_templates(prefix, suffix, configs) if round_robin else configs
    parts: dict[str, list[Dataset]] = {}
    for config in configs:
        splits = load(config)
        for ours, theirs in (("train", "train"), ("test", eval_split), ("validation", eval_split)):
            if theirs not in splits or (ours != "train" and config not in evaluated):
                continue
            ds = splits[theirs]
            if ours != "train" and round_robin:  # P3 renders example j as row j of every template's config
                t = evaluated.index(config)
                ds = ds.select(range(t, len(ds), len(evaluated)))
            parts.setdefault(ours, []).append(ds.add_column("template", [config] * len(ds)))
    return DatasetDict({k: concatenate_datasets(v) for k, v in parts.items()})


def bigbench_records(rows: Dataset, task: str) -> Dataset:
    """tasksource/bigbench rows (inputs, targets, multiple_choice_targets, multiple_choice_scores) as
    uniform records: multiple choice -> choices, label (first correct), correct (all correct);
    generative (no choices) -> target = first reference, answers = all references."""

    def fmt(r: dict[str, Any]) -> dict[str, Any]:
        choices = list(r["multiple_choice_targets"] or [])
        correct = [i for i, s in enumerate(r["multiple_choice_scores"] or []) if s == 1]
        answers = list(r["targets"])
        if choices and not correct:
            raise ValueError(f"{task}: a multiple-choice row without a correct choice: {r['inputs'][:80]!r}")
        return {
            "task": task,
            "source": r["inputs"],
            "target": choices[correct[0]] if choices else answers[0],
            "choices": choices,
            "label": correct[0] if choices else -1,
            "correct": correct,
            "answers": answers,
        }

    return rows.map(fmt, remove_columns=rows.column_names)


def _bigbench(name: str) -> DatasetDict:
    from common.data import hub

    hub_id, config = BIGBENCH_SOURCES[name]
    ds = hub._load(hub_id, _OFFLINE, config)
    if hub_id == "lukaemon/bbh":  # answer choices as the original's gin; multistep arithmetic is generative
        test = ds["test"]
        choices = [] if config == "multistep_arithmetic_two" else sorted(set(test["target"]))
        rows = Dataset.from_dict(
            {
                "inputs": test["input"],
                "targets": [[t] for t in test["target"]],
                "multiple_choice_targets": [choices] * len(test),
                "multiple_choice_scores": [[int(c == t) for c in choices] for t in test["target"]],
            }
        )
    else:  # the original's split "train_validation": both splits (the tasks are held out from training)
        rows = concatenate_datasets([ds[s] for s in ("train", "validation") if s in ds])
    out = bigbench_records(rows, config)
    return DatasetDict({"test": out, "validation": out})


PAPER_DATASETS: dict[str, Callable[[], DatasetDict]] = {
    **{name: partial(p3_dataset, name) for name in P3_SOURCES},
    **{name: partial(_bigbench, name) for name in BIGBENCH_SOURCES},
}
