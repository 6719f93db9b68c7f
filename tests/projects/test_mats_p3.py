"""The paper's data path: p3_eight_qa read from bigscience/P3 as the original's dataset readers build it.

The hub is out of reach, so each test writes a fake P3 in the hub's columns (one DatasetDict per
config, `save_to_disk`) and points MOERGING_P3_DIR at it; `common.data.hub.p3` reads it through the same
code as a hub download.
"""

import shutil
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from common.data.hub import HubOffline
from projects.mats import experiment
from projects.mats.experiment import eval_data, evaluate, resolve, squad_f1
from projects.mats.main import main
from projects.mats.tasks import P3_DATA_DIR, P3_HOLDOUT, P3_TEMPLATES, answer, load_task, p3_split

CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "mats" / "configs"
EXTRA_TRAIN, N_TEST = 3, 4  # train examples beyond the validation holdout; HF validation examples
_COLUMNS = {
    "inputs": Sequence(Value("int32")),
    "inputs_pretokenized": Value("string"),
    "targets": Sequence(Value("int32")),
    "targets_pretokenized": Value("string"),
}


def _choices(task: str) -> list[str]:
    return [f"{task} answer {k}" for k in range(3)]


def write_task(root: Path, task: str, n_train: int | None = None, short: str | None = None) -> None:
    """One P3 config per template of `task`, rows as P3 stores them: the target keeps the template's
    surrounding whitespace, the choices do not; ROPES has no choices. `short` gets one row fewer."""
    n_train = n_train or P3_HOLDOUT.get(task, 1000) + EXTRA_TRAIN
    generative = task == "ropes"
    features = Features(_COLUMNS if generative else {**_COLUMNS, "answer_choices": Sequence(Value("string"))})
    for config in P3_TEMPLATES[task]:
        splits = {}
        for split, n in (("train", n_train - (config == short)), ("validation", N_TEST)):
            rows = {k: [] for k in features}
            for i in range(n):
                target = f"ropes answer {i}" if generative else _choices(task)[i % 3]
                rows["inputs_pretokenized"].append(f"{config} | {split} {i}\n")
                rows["targets_pretokenized"].append(f"\n{target} ")
                rows["inputs"].append([1, 2])
                rows["targets"].append([3])
                if not generative:
                    rows["answer_choices"].append(_choices(task))
            splits[split] = Dataset.from_dict(rows, features=features)
        DatasetDict(splits).save_to_disk(str(root / config))


@pytest.fixture(scope="module")
def p3(tmp_path_factory):
    root = tmp_path_factory.mktemp("p3")
    for task in P3_TEMPLATES:
        write_task(root, task)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(P3_DATA_DIR, str(root))
        p3_split.cache_clear()
        yield root
    p3_split.cache_clear()


def test_splits_follow_the_original_readers(p3):
    configs, holdout = P3_TEMPLATES["quartz"], 200
    n = holdout + EXTRA_TRAIN
    val = load_task("quartz", "validation")
    assert len(val) == holdout  # QuaRTz's own holdout, not 1000
    for j, ex in enumerate(val):  # validation = the last 200 train examples, example j on template j mod T
        i = n - holdout + j
        assert ex["question"] == f"{configs[j % len(configs)]} | train {i}\n"
        assert ex["choices"] == _choices("quartz") and ex["label"] == i % 3
        assert answer(ex) == ex["target"] == _choices("quartz")[i % 3]
    train = load_task("quartz", "train")
    assert len(train) == EXTRA_TRAIN * len(configs)  # every example x template pair, example-major
    assert [ex["question"] for ex in train[: len(configs)]] == [f"{c} | train 0\n" for c in configs]
    test = load_task("quartz", "test")  # HF validation
    assert [ex["question"] for ex in test] == [f"{configs[j]} | validation {j}\n" for j in range(N_TEST)]
    # QASC has no labelled test split: the original evaluates `test` on its validation examples.
    assert load_task("qasc", "test") == load_task("qasc", "validation")
    assert len(load_task("qasc", "validation")) == 500
    ropes = load_task("ropes", "validation")
    assert len(ropes) == 1000 and all(ex["choices"] == [] and ex["label"] == -1 for ex in ropes)
    assert answer(ropes[0]) == f"ropes answer {EXTRA_TRAIN}"
    assert len(load_task("ropes", "validation", max_examples=7)) == 7


def test_paper_config_reads_the_eight_tasks(p3):
    cfg = resolve([CONFIGS / "paper_t5_large.yaml", CONFIGS / "paper_multitask_run.yaml"], {}, [])
    data = eval_data(cfg)  # p3_eight_qa, validation, at most 1000 per task
    assert list(data) == list(P3_TEMPLATES)
    for task, examples in data.items():
        assert len(examples) == min(1000, P3_HOLDOUT.get(task, 1000))
        if task == "ropes":
            assert all(not ex["choices"] for ex in examples)
        else:
            assert all(ex["choices"] == _choices(task) and 0 <= ex["label"] < 3 for ex in examples)
            assert {ex["template"] for ex in examples} == set(P3_TEMPLATES[task])


def test_p3_errors(tmp_path, monkeypatch):
    p3_split.cache_clear()
    monkeypatch.delenv(P3_DATA_DIR, raising=False)
    with pytest.raises(HubOffline, match=P3_DATA_DIR):  # conftest keeps the hub offline
        load_task("wiki_qa", "test")
    monkeypatch.setenv(P3_DATA_DIR, str(tmp_path))
    write_task(tmp_path, "wiki_qa", short="wiki_qa_exercise")
    with pytest.raises(ValueError, match="differ in length"):
        load_task("wiki_qa", "train")
    write_task(tmp_path, "quartz", n_train=150)
    with pytest.raises(ValueError, match="not more than the 200 held out"):
        load_task("quartz", "validation")
    bad = tmp_path / "bad"
    write_task(bad, "social_iqa")
    config = P3_TEMPLATES["social_iqa"][1]
    ds = DatasetDict.load_from_disk(str(bad / config))
    ds["validation"] = ds["validation"].map(lambda r: {"targets_pretokenized": "none of them"})
    ds.save_to_disk(str(tmp_path / "moved"))
    shutil.rmtree(bad / config)
    shutil.move(tmp_path / "moved", bad / config)
    monkeypatch.setenv(P3_DATA_DIR, str(bad))
    with pytest.raises(ValueError, match="'none of them' is not one of"):
        load_task("social_iqa", "test")
    p3_split.cache_clear()


def test_squad_f1_hand_computed():
    assert squad_f1("The cat sat.", ["a cat sat down"]) == pytest.approx(0.8)  # P = 1, R = 2/3
    assert squad_f1("dog", ["cat"]) == 0.0
    assert squad_f1("dog", ["cat", "the dog"]) == 1.0  # best reference


def test_generative_task_scored_by_exact_match_and_f1(monkeypatch):
    examples = [
        {"task": "ropes", "question": "q0", "choices": [], "label": -1, "target": "ropes answer 0"},
        {"task": "ropes", "question": "q1", "choices": [], "label": -1, "target": "ropes answer 1"},
    ]
    monkeypatch.setattr(experiment, "generate", lambda *a, **k: ["Ropes answer 0", "answer 7"])
    cfg = resolve([CONFIGS / "micro_t5.yaml"], {}, [])

    class Stub:  # a decoder-only model: no question is cut
        config = type("C", (), {"is_encoder_decoder": False})()

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0] * len(text)}

    # EM 1/2; F1 (1 + 0.4)/2 (second: P = 1/2, R = 1/3); score = mean of the two.
    assert evaluate(Stub(), Tok(), {"ropes": examples}, cfg) == {"ropes": 0.6, "average": 0.6}


def test_train_and_infer_on_p3_data(p3, tmp_path, capsys):
    common = ["-o", f"experiment.exp_out={tmp_path}", "experiment.run_name=s0"]
    micro = ["-c", str(CONFIGS / "micro_t5.yaml")]
    main(["train", *micro, "-td", "train_dataset=quartz", "-ed", "evaluation_dataset=quartz", *common])
    run = tmp_path / "offline" / "quartz" / "micro-t5" / "full_model" / "s0"
    capsys.readouterr()
    main(["inference", "-e", str(run), "-ed", "split=test", "-i", "ropes"])  # generation, 64 tokens at most
    out = capsys.readouterr().out
    score = float(out.split("ropes: ")[1].split()[0])
    assert 0.0 <= score <= 1.0
