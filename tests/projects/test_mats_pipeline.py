"""The README's pipeline in-process through `main.main(argv)` (train -> metadata -> merges -> inference)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from common.config import ConfigError
from common.io import save_tensors
from projects.mats.main import main
from projects.mats.merging import MergeError
from projects.mats.model import build, load_state, read_state

CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "mats" / "configs"
FULL = ["-c", str(CONFIGS / "micro_t5.yaml")]
IA3 = ["-c", str(CONFIGS / "micro_t5.yaml"), str(CONFIGS / "micro_ia3.yaml")]
TASKS = ("gsm_language_id", "champ_category")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mats_pipeline")
    registry = root / "checkpoints.yaml"
    common = ["-o", f"experiment.exp_out={root}", f"experiment.checkpoint_registry={registry}"]
    for configs in (FULL, IA3):
        for task in TASKS:
            main(["train", *configs, "-td", f"train_dataset={task}", "-ed", f"evaluation_dataset={task}",
                  "--register", str(registry), *common, "experiment.run_name=s0"])  # fmt: skip
    return root, common


def test_pipeline_full_model(world, capsys):
    root, common = world
    args = ["-d", "micro_two", "--checkpoint_descriptor", "full_model", *common]
    main(["save_fisher", *FULL, "-f", "diagonal", *args])
    main(["save_gram_matrix", *FULL, *args])
    main(["individual_models", *FULL, *args])
    for command in ("average", "ties", "diagonal_fisherMerging", "regmean"):
        main([command, *FULL, *args])
    main(["task_vectors", *FULL, *args, "--model_lambda", "0.3"])
    ta = root / "merging/offline/micro_two/micro-t5/full_model/task_vectors/model_lambda_0.3/merged_model"
    # the merged model is a save_pretrained folder: transformers loads it as the merge's weights
    merged = AutoModelForSeq2SeqLM.from_pretrained(ta).eval()
    state = read_state(ta)
    assert state and all(torch.equal(merged.get_parameter(k), v) for k, v in state.items())
    expected = build(yaml.safe_load((CONFIGS / "micro_t5.yaml").read_text())["model"])[0]
    load_state(expected, "full_model", state)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "decoder_input_ids": torch.tensor([[0, 9]])}
    with torch.no_grad():
        assert torch.equal(merged(**batch).logits, expected.eval()(**batch).logits)
    main(["conjugateGradient_average", *FULL, *args, "--initialization", "average"])
    main(["conjugateGradient_diagonalFisher", *FULL, *args])
    main(["conjugateGradient_fisherMerging", *FULL, *args, "--initialization", str(ta)])
    main(["conjugateGradient_fisherMerging", *FULL, *args, "--use_backward", "--initialization", str(ta)])
    main(["conjugateGradient_fisherMerging", *FULL, *args, "--use_backward", "--initialization", str(ta),
          "--lm_head", "solve", "--cg_dtype", "float64"])  # fmt: skip
    cg = root / "merging/offline/micro_two/micro-t5/full_model/conjugate_gradients"
    kfac, solved = sorted(cg.glob("fisher_merging_kfac_*"), key=lambda p: len(p.name))
    assert solved.name == kfac.name + "_float64_lm_head_solve"
    blocks = {b["block"] for b in json.loads((kfac / "log.json").read_text())[0]["blocks"]}
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in blocks and "lm_head.weight" not in blocks
    blocks = {b["block"] for b in json.loads((solved / "log.json").read_text())[0]["blocks"]}
    assert "lm_head.weight" in blocks
    # The original's K-FAC leaves lm_head out of the solve and averages it over the experts.
    merged = read_state(Path(json.loads((kfac / "results.json").read_text())["merged_model"]))
    registry = yaml.safe_load((root / "checkpoints.yaml").read_text())
    paths = [p for fmts in registry.values() for d in fmts.values() for p in d["full_model"].values()]
    heads = [read_state(Path(p))["lm_head.weight"] for p in paths]
    assert len(heads) == 2
    torch.testing.assert_close(merged["lm_head.weight"], torch.stack(heads).mean(0))
    results = json.loads(
        (root / "merging/offline/micro_two/micro-t5/full_model/ties/results.json").read_text()
    )
    assert [r["model_lambda"] for r in results["sweep"]] == [round(0.1 * i, 1) for i in range(11)]
    capsys.readouterr()
    main(
        [
            "inference",
            "--merged_model",
            results["merged_model"],
            "-ed",
            "evaluation_split=test",
            "-i",
            "micro_two",
        ]
    )
    assert set(yaml.safe_load(capsys.readouterr().out)["test"]) == {*TASKS, "average"}


def test_pipeline_ia3(world, capsys):
    root, common = world
    args = ["-d", "micro_two", "--checkpoint_descriptor", "ia3", *common]
    main(["save_fisher", *IA3, "-f", "blockwise", "--use_true_fisher", *args])
    main(["conjugateGradient_fisherMerging", *IA3, *args, "-f", "blockwise", "--use_true_fisher",
          "--num_iterations", "10", "--initialization", "pretrained"])  # fmt: skip
    run = root / "offline/champ_category/micro-t5/ia3/s0"
    # an (IA)^3 expert is a PEFT adapter folder: PeftModel loads it with the same outputs as ours
    ckpt = (
        run / f"checkpoint_{json.loads((run / 'results.json').read_text())['metrics']['best_checkpoint_idx']}"
    )
    _same_as_peft(ckpt)
    cg = next((root / "merging/offline/micro_two/micro-t5/ia3/conjugate_gradients").glob("*/model_lambda_*"))
    _same_as_peft(cg / "merged_model")  # a merged (IA)^3 model too
    capsys.readouterr()
    main(["inference", "-e", str(run), "-ed", "split=train", "-er", "eval_batch_size=32"])
    assert "champ_category" in yaml.safe_load(capsys.readouterr().out)["train"]


def _same_as_peft(folder):
    """`PeftModel.from_pretrained` on the folder computes what our (IA)^3 model with its vectors computes."""
    config = yaml.safe_load((CONFIGS / "micro_t5.yaml").read_text())
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "IA3"
    base = AutoModelForSeq2SeqLM.from_pretrained(adapter_config["base_model_name_or_path"])
    theirs = PeftModel.from_pretrained(base, folder).eval()
    ours = build({**config["model"], "format": "ia3"})[0]
    state = read_state(folder)
    assert all(not torch.equal(v, torch.ones_like(v)) for v in state.values())  # trained, not the init
    load_state(ours, "ia3", state)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "decoder_input_ids": torch.tensor([[0, 9]])}
    with torch.no_grad():
        assert torch.equal(theirs(**batch).logits, ours.eval()(**batch).logits)


def test_earlier_bare_state_layout_still_reads(world, tmp_path):
    root, _ = world
    run = root / "offline/champ_category/micro-t5/ia3/s0"
    folder = next(run.glob("checkpoint_[0-9]*"))
    save_tensors(tmp_path / "checkpoint_0.safetensors", read_state(folder))
    old = read_state(tmp_path / "checkpoint_0.safetensors")
    assert old.keys() == read_state(folder).keys()
    assert all(torch.equal(old[k], v) for k, v in read_state(folder).items())
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter folder"):
        read_state(tmp_path)


def test_clear_errors(world):
    root, common = world
    args = ["-d", "micro_two", "--checkpoint_descriptor", "ia3", *common]
    with pytest.raises(MergeError, match=r"missing metadata .*run `main\.py save_gram_matrix`"):
        main(["regmean", *IA3, *args])
    with pytest.raises(KeyError, match=r"has no micro-t5/offline/lora"):
        main(["average", *IA3, "-d", "micro_two", "--checkpoint_descriptor", "lora", *common])
    with pytest.raises(KeyError, match=r"Did you mean 'micro_two'"):
        main(["average", *IA3, "-d", "micro_tow", "--checkpoint_descriptor", "ia3", *common])
    with pytest.raises(ConfigError, match=r"unknown config key 'train_run\.learning_rate'"):
        main(["train", *FULL, "-tr", "learning_rate=0.1"])
    with pytest.raises(KeyError, match="another base model or format"):
        # (IA)^3 vectors loaded into a fully fine-tuned model
        ia3_ckpt = next((root / "offline/champ_category/micro-t5/ia3/s0").glob("checkpoint_[0-9]*"))
        main(["inference", *FULL, "--merged_model", str(ia3_ckpt)])


def test_decoder_only_experts_merge_and_infer(tmp_path, capsys):
    # The seed's OPT-1.3b inference example, at micro scale: a decoder-only base (GPT-Neo) through train,
    # Grams, a merge, and both kinds of inference.
    registry = tmp_path / "checkpoints.yaml"
    common = ["-o", f"experiment.exp_out={tmp_path}", f"experiment.checkpoint_registry={registry}"]
    neo = [*FULL, "-m", "base=gpt_neo"]
    for task in TASKS:
        main(["train", *neo, "-td", f"train_dataset={task}", "-ed", f"evaluation_dataset={task}",
              "--register", str(registry), *common, "experiment.run_name=s0"])  # fmt: skip
    args = ["-d", "micro_two", "--checkpoint_descriptor", "full_model", *common]
    main(["save_gram_matrix", *neo, *args])
    main(["regmean", *neo, *args, "--model_lambda", "0.5"])
    merged = tmp_path / "merging/offline/micro_two/micro-gpt_neo/full_model/regmean/model_lambda_0.5"
    capsys.readouterr()
    assert isinstance(AutoModelForCausalLM.from_pretrained(merged / "merged_model"), torch.nn.Module)
    main(["inference", "--merged_model", str(merged / "merged_model"), "-ed", "evaluation_split=test",
          "-i", "micro_two"])  # fmt: skip
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"] == "micro-gpt_neo" and set(out["test"]) == {*TASKS, "average"}
    run = tmp_path / "offline/champ_category/micro-gpt_neo/full_model/s0"
    idx = json.loads((run / "results.json").read_text())["metrics"]["best_checkpoint_idx"]
    main(["inference", "-e", str(run), "--checkpoint_idx", str(idx), "-ed", "split=train"])
    assert "champ_category" in yaml.safe_load(capsys.readouterr().out)["train"]
    with pytest.raises(SystemExit, match=rf"no checkpoint {idx + 1}; it keeps \['checkpoint_{idx}"):
        main(["inference", "-e", str(run), "--checkpoint_idx", str(idx + 1)])


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="the machine has the GPUs -w 2 asks for")
def test_world_size_without_gpus_fails_clearly():
    with pytest.raises(SystemExit, match=r"train -w 2: needs 2 GPUs, this machine has \d"):
        main(["train", *FULL, "-w", "2"])
