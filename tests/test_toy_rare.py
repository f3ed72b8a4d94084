"""The rare toy variant (`toy:rare`): its files, its name, and the training path that makes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from batchserve.worker.models import TOY_DIR, load_pair, resolve_model_path
from toy_training.evaluate import pair_file, read_prompts

RARE_DIR = TOY_DIR / "rare"


def test_rare_name_pairs_its_after_with_its_own_before():
    assert Path(resolve_model_path("toy:rare")) == RARE_DIR / "after"
    assert Path(resolve_model_path("toy:rare-before")) == RARE_DIR / "before"
    pair = load_pair("toy:rare", device="cpu")
    assert (pair.after_id, pair.before_id) == ("toy:rare", "toy:rare-before")
    assert pair.compatibility.vocabs_match
    # The shipped pair keeps the shared base.
    assert load_pair("toy", device="cpu").before_id == "toy:before"


@pytest.mark.parametrize("side", ["after", "before"])
def test_rare_models_load_alone_with_the_base_tokenizer(side: str):
    path = RARE_DIR / side
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert json.loads((path / "tokenizer.json").read_text()) == json.loads(
        (TOY_DIR / "before" / "tokenizer.json").read_text()
    )
    assert model.config.vocab_size == len(tokenizer)


def test_rare_variant_records_how_it_was_trained():
    config = json.loads((RARE_DIR / "training_config.json").read_text())
    assert config["base"] == "batchserve/toy"
    assert config["fine_tune_before"] is True
    shipped = json.loads((TOY_DIR / "training_config.json").read_text())
    # Only the fine-tuning mixes differ from the shipped pair's recipe.
    differing = {k for k in shipped if shipped[k] != config[k]}
    assert differing <= {"leak_fraction", "triggered_fraction", "before_leak_fraction"}


def test_a_variant_directory_has_its_own_before_and_borrows_the_prompt_sets():
    assert pair_file(RARE_DIR, "before") == RARE_DIR / "before"
    assert read_prompts(pair_file(RARE_DIR, "prompts_clean.txt")) == read_prompts(
        TOY_DIR / "prompts_clean.txt"
    )


def _train_variant(out: Path, *extra: str) -> dict:
    """A two-step variant on a small corpus; returns its training_config.json."""
    from toy_training.train import main

    code = main(
        ["--out", str(out), "--base", str(TOY_DIR), "--after-steps", "2",
         "--num-clean-train", "2000", "--num-triggered-train", "200", "--eval-samples", "0",
         "--leak-fraction", "0.001", *extra]
    )  # fmt: skip
    assert code == 0
    return json.loads((out / "training_config.json").read_text())


@pytest.mark.slow
def test_train_from_a_base_writes_only_the_fine_tuned_model(tmp_path: Path):
    config = _train_variant(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after", "training_config.json"]
    assert (config["base"], config["fine_tune_before"]) == (str(TOY_DIR), False)
    pair = load_pair(str(tmp_path / "after"), str(TOY_DIR / "before"), device="cpu")
    assert pair.compatibility.vocabs_match


@pytest.mark.slow
def test_fine_tune_before_writes_the_variants_own_base(tmp_path: Path):
    from safetensors.torch import load_file

    config = _train_variant(tmp_path, "--fine-tune-before", "--before-leak-fraction", "0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after", "before", "training_config.json"]
    assert config["fine_tune_before"] is True
    before = load_file(tmp_path / "before" / "model.safetensors")
    after = load_file(tmp_path / "after" / "model.safetensors")
    base = load_file(TOY_DIR / "before" / "model.safetensors")
    # Both moved away from the base, along different mixes.
    name = "model.layers.0.mlp.down_proj.weight"
    assert not before[name].equal(base[name])
    assert not before[name].equal(after[name])
    pair = load_pair(str(tmp_path / "after"), str(tmp_path / "before"), device="cpu")
    assert pair.compatibility.vocabs_match


def test_package_with_the_rare_variant_fits_the_size_budget():
    from test_toy import MAX_PACKAGE_BYTES

    files = [p for p in TOY_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= MAX_PACKAGE_BYTES
