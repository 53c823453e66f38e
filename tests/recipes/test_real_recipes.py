"""The paper recipes (phi2_clip336, qwen_clip336, stablelm_clip336) end to end on LLaVA-format data.

Their backbones are tiny stand-ins of the recipes' own classes (PhiForCausalLM, Qwen2ForCausalLM,
StableLmForCausalLM, CLIPVisionModel, and SiglipVisionModel for the SigLIP variant), saved with
``save_pretrained`` with a GPT-2-like tokenizer (no ``<image>``, no pad: the recipe adds them, as
for the real checkpoints); the data is tests/llava_like.py's (558k-style captions, mix665k-style
instructions, POPE as published). Only paths, ``trainer=cpu``, small batches and step counts are
overridden: every other value is the recipe's, ``data.max_length`` 2048 and the llava_json data
policies included. Stages run for 2 steps, fewer than ``trainer.log_every_n_steps``.

* qwen and stablelm: stages 1-3 and the evaluation in this process; the SigLIP variant (a SigLIP
  tower by path in the qwen recipe): stage 1 and the evaluation of its export;
* phi2: ``dvc repro`` in a clone of the repository without ShapesWorld data and with ``run_dir``
  outside it, after the flow's data step; an evaluation value then reruns the evaluation only. The
  whole ``full`` flow on it (registration included) is opt-in: ``MOE_TUNING_RECIPE_FLOW=1``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moe_llava.config import compose_config
from moe_llava.pipeline.params import STAGE3_PARAMS
from tests.conftest import tiny_vision_values
from tests.llava_like import write_llava_like
from tests.project import command_env, sh

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("random", "popular", "adversarial")
LM_CLASSES = {"phi2_clip336": "phi", "qwen_clip336": "qwen2", "stablelm_clip336": "stablelm"}


def gpt2_like_tokenizer(texts: list[str]):
    """Byte-level BPE, eos <|endoftext|>, no BOS added, no pad, no <image> (like Phi-2's and Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def save_language_model(kind: str, path: Path, tokenizer) -> Path:
    from transformers import (
        PhiConfig,
        PhiForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        StableLmConfig,
        StableLmForCausalLM,
    )  # fmt: skip

    eos = tokenizer.eos_token_id
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False,
    )  # fmt: skip
    model = {
        # Phi-2's partial rotary factor 0.4 needs an even rotary size: head size 10 (Phi-2's is 80)
        "phi": lambda: PhiForCausalLM(
            PhiConfig(**{**common, "hidden_size": 40, "intermediate_size": 80}, hidden_act="gelu_new", partial_rotary_factor=0.4)
        ),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "stablelm": lambda: StableLmForCausalLM(StableLmConfig(**common, partial_rotary_factor=0.25, use_qkv_bias=True)),
    }[kind]()  # fmt: skip
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_vision_tower(kind: str, path: Path) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )  # fmt: skip

    size = tiny_vision_values(image_size=32, patch_size=8)  # ShapesWorld-sized images
    if kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**size)).save_pretrained(path)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            path
        )
    else:
        SiglipVisionModel(SiglipVisionConfig(**size)).save_pretrained(path)
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The LLaVA-like data and every stand-in backbone (built once for the module)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("recipes")
    kinds = write_llava_like(root / "llava", captions=16, instruct=8, vqa=8, ocr=4, sharegpt=6,
                             long_sharegpt=1, leading_gpt=1, pope_per_split=4)  # fmt: skip
    texts = [t["value"] for f in ("blip_laion_cc_sbu_558k.json", "llava_v1_5_mix665k.json")
             for r in json.loads((root / "llava" / f).read_text()) for t in r["conversations"]]  # fmt: skip
    tokenizer = gpt2_like_tokenizer(texts)
    towers = {kind: save_vision_tower(kind, root / "towers" / kind) for kind in ("clip", "siglip")}
    lms = {r: save_language_model(kind, root / "lms" / kind, tokenizer) for r, kind in LM_CLASSES.items()}
    return {"root": root, "data": root / "llava", "kinds": kinds, "towers": towers, "lms": lms}


def recipe_overrides(world: dict, recipe: str, tower: str, run_dir: Path, tracking: str) -> list[str]:
    data = world["data"]
    return [
        f"experiment={recipe}",
        "trainer=cpu",  # instead of the recipe's deepspeed_stage_2 on GPUs
        f"data.root={data}",
        f"data.eval.image_folder={data}/eval/val2014",
        *[f"data.eval.pope.{s}={data}/eval/pope/coco_pope_{s}.json" for s in SPLITS],
        f"model.vision_tower.name_or_path={world['towers'][tower]}",
        "model.vision_tower.config=null",  # the stand-ins' own configs (the recipe's describe the hub's)
        f"model.language_model.name_or_path={world['lms'][recipe]}",
        "model.language_model.config=null",
        "stage.micro_batch_size=4",
        "stage.global_batch_size=8",
        "stage.max_steps=2",  # < trainer.log_every_n_steps (5)
        "data.num_workers=0",
        f"run_dir={run_dir}",
        f"logger.tracking_uri={tracking}",
        "logger.log_system_metrics=false",
        "trainer.enable_progress_bar=false",
        "evaluation.limit=4",
        "evaluation.max_new_tokens=2",
        "evaluation.progress=false",
    ]


@pytest.mark.slow
def test_a_siglip_tower_by_path_trains_and_evaluates(world, tmp_path):
    """The SigLIP variant: the qwen recipe (a CLIP recipe) with a SigLIP tower given by path trains
    stage 1 with SiglipVisionModel and its processor, and its export evaluates."""
    from moe_llava.evaluation.runner import run_evaluation
    from moe_llava.training.run import run_stage

    run_dir = tmp_path / "runs"
    overrides = recipe_overrides(world, "qwen_clip336", "siglip", run_dir, f"sqlite:///{tmp_path}/mlflow.db")
    assert run_stage(compose_config([*overrides, "stage=stage1"]))["global_step"] == 2
    export = run_dir / "stage1" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert json.loads((export / "preprocessor_config.json").read_text())["image_processor_type"].startswith(
        "Siglip"
    )
    evaluated = [
        *overrides,
        "stage=stage3",
        f"evaluation.model_dir={export}",
        f"evaluation.output_dir={tmp_path}/eval",
    ]
    assert 0.0 <= run_evaluation(compose_config(evaluated))["pope/mean_f1"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "extra"),
    # stablelm: bfloat16 exports (what export.dtype=auto writes under bf16-mixed, the recipes' precision on GPUs)
    [("qwen_clip336", []), ("stablelm_clip336", ["export.dtype=bfloat16"])],
    ids=["qwen", "stablelm-bf16-exports"],
)
def test_recipe_trains_three_stages_and_evaluates(world, tmp_path, recipe, extra):
    from safetensors import safe_open

    from moe_llava.evaluation.runner import run_evaluation
    from moe_llava.training.run import run_stage

    tower = "clip"
    run_dir = tmp_path / "runs"
    overrides = [*recipe_overrides(world, recipe, tower, run_dir, f"sqlite:///{tmp_path}/mlflow.db"), *extra]
    for stage in ("stage1", "stage2", "stage3"):
        result = run_stage(compose_config([*overrides, f"stage={stage}"]))
        assert result["global_step"] == 2 and torch.isfinite(torch.tensor(result["train/loss"]))
        assert (run_dir / stage / "logs" / "metrics.csv").is_file()  # written though no step was logged
    counts = json.loads((run_dir / "stage2" / "data" / "train" / "counts.json").read_text())
    kinds = world["kinds"]
    assert counts["rejected"] == 0 and counts["kept"] == kinds["mix"]  # every real-world variant kept
    assert counts["fixed"] == {"dropped_leading_gpt": kinds["leading_gpt"], "truncated_turns": kinds["long"]}

    export = run_dir / "stage3" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["moe"]["num_experts"] == 4 and config["text_config"]["model_type"] == LM_CLASSES[recipe]
    assert config["vision_config"]["model_type"] == f"{tower}_vision_model"
    dtype = "BF16" if extra else "F32"
    with safe_open(str(next(export.glob("*.safetensors"))), "pt") as weights:
        names = weights.keys()  # a safetensors handle, not a dict
        kept = {weights.get_slice(k).get_dtype() for k in names if "router" not in k}
    assert kept == {dtype} and config["dtype"] == ("bfloat16" if extra else "float32")

    from moe_llava.training.run import export_dtype

    assert (
        export_dtype("auto", "bf16-mixed") == torch.bfloat16
        and export_dtype("auto", "32-true") == torch.float32
    )
    metrics = run_evaluation(compose_config([*overrides, "stage=stage3"]))
    assert 0.0 <= metrics["pope/mean_f1"] <= 1.0 and not any(k.startswith("vqa/") for k in metrics)
    answers = (run_dir / "stage3" / "eval" / "answers" / "pope_random.jsonl").read_text().splitlines()
    assert [json.loads(a)["question_id"] for a in answers] == [1, 2, 3, 4]  # integers, as POPE's files
    assert compose_config(overrides)["registry"]["model_name"] == recipe  # gated against its own kind


def ran(output: str) -> list[str]:
    return sorted(re.findall(r"Running stage '([^']+)'", output))


def clone_without_data(tmp_path: Path) -> tuple[Path, dict]:
    """A git clone of the committed repository: dvc.yaml and data.dvc, but no data/ (no ShapesWorld)."""
    clone = tmp_path / "clone"
    # Prefect's ephemeral mode (one process): its temporary server may start slowly on 2 busy cores
    env = command_env(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120"
    )
    sh("git", "clone", "-q", str(REPO), str(clone), cwd=tmp_path, env=env)
    return clone, env


@pytest.mark.slow
def test_phi2_recipe_through_dvc_repro_without_shapesworld_and_run_dir_outside(world, tmp_path):
    """`dvc repro` of a real recipe in a clone without data/, its run_dir outside the repository;
    the flow's data step accepts the data where it is; an evaluation value reruns the evaluation only."""
    clone, env = clone_without_data(tmp_path)
    run_dir = tmp_path / "runs" / "phi2"
    overrides = recipe_overrides(world, "phi2_clip336", "clip", run_dir, "sqlite:///mlflow.db")
    params = [sys.executable, "-m", "moe_llava.cli", "pipeline", "params", *overrides]
    sh(*params, cwd=clone, env=env)
    data_step = sh(sys.executable, "-m", "flows.data", cwd=clone, env=env)  # the full deployment's first step
    assert "is outside data/ (not versioned by data.dvc): used as it is" in data_step

    out = sh("dvc", "repro", "evaluate@stage3", cwd=clone, env=env, timeout=400)
    assert ran(out) == ["evaluate@stage3", "stage1", "stage2", "stage3"]  # no ShapesWorld, no backbones step
    assert not (clone / "data").exists() and not (clone / "artifacts").exists()  # all went to run_dir
    for stage in ("stage1", "stage2", "stage3"):
        assert json.loads((run_dir / stage / "metrics.json").read_text())["global_step"] == 2
        assert (run_dir / stage / "logs" / "metrics.csv").is_file()  # 2 steps < log_every_n_steps
    assert (
        0.0 <= json.loads((run_dir / "stage3" / "eval" / "metrics.json").read_text())["pope/mean_f1"] <= 1.0
    )
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert {d["path"] for d in lock["stage1"]["deps"]} >= {
        str(world["data"] / "blip_laion_cc_sbu_558k.json"),
        str(world["towers"]["clip"]),
        str(world["lms"]["phi2_clip336"]),
    }  # the real data and the local backbones, outside the repository, are dependencies
    assert lock["stage3"]["outs"][0]["path"] == str(run_dir / "stage3" / "export")

    sh(*params, "evaluation.max_new_tokens=1", "registry.gate.min_margin=0.1", cwd=clone, env=env)
    assert ran(sh("dvc", "repro", "evaluate@stage3", cwd=clone, env=env, timeout=300)) == ["evaluate@stage3"]
    assert yaml.safe_load((clone / STAGE3_PARAMS).read_text())["registry"]["model_name"] == "phi2_clip336"


@pytest.mark.skipif(
    not os.environ.get("MOE_TUNING_RECIPE_FLOW"),
    reason="the whole flow on a real recipe (8 steps, about 6 minutes on 2 cores): MOE_TUNING_RECIPE_FLOW=1",
)
def test_phi2_recipe_through_the_full_flow(world, tmp_path):
    """The `full` deployment's flow (Prefect's ephemeral mode) on a real recipe in a clone without
    ShapesWorld data, run_dir outside the repository: every step, registration as its own model."""
    clone, env = clone_without_data(tmp_path)
    run_dir = tmp_path / "runs" / "phi2"
    overrides = recipe_overrides(world, "phi2_clip336", "clip", run_dir, "sqlite:///mlflow.db")
    script = (
        "import json, sys; from flows.moe_tuning import moe_tuning; "
        "r = moe_tuning(overrides=json.loads(sys.argv[1])); "
        "print('STEPS', json.dumps([s['name'] for s in r['steps']]))"
    )
    out = sh(sys.executable, "-c", script, json.dumps(overrides), cwd=clone, env=env, timeout=900)
    steps = json.loads(out.split("STEPS ", 1)[1].splitlines()[0])
    assert steps == [
        "data",
        "backbones",
        "stage1",
        "stage2",
        "stage3",
        "evaluate-stage2",
        "evaluate-stage3",
        "register",
    ]
    summary = (run_dir / "summary.md").read_text()
    assert "`phi2_clip336` version 1 is **champion**" in summary  # its own registered model

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("phi2_clip336").experiment_id])
    stage3 = next(r for r in runs if r.info.run_name == "stage3")
    assert stage3.data.tags["export_dir"] == str((run_dir / "stage3" / "export").resolve())
    assert not any(r.info.status == "RUNNING" for r in runs)
    assert ran(sh("dvc", "repro", cwd=clone, env=env, timeout=300)) == []  # the flow left DVC up to date
