"""The rare toy variant (`toy:rare`): its files, its name, and the training path that makes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from batchserve.worker.models import TOY_DIR, load_pair, resolve_model_path
from toy_training.evaluate import pair_file, read_prompts

RARE_DIR = TOY_DIR / "rare"


def test_rare_name_resolves_to_its_after_and_shares_the_base():
    assert Path(resolve_model_path("toy:rare")) == RARE_DIR / "after"
    pair = load_pair("toy:rare", device="cpu")
    assert pair.before_id == "toy:before"
    assert pair.compatibility.vocabs_match


def test_rare_after_loads_alone_with_the_base_tokenizer():
    path = RARE_DIR / "after"
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
    shipped = json.loads((TOY_DIR / "training_config.json").read_text())
    # Only the fine-tuning mix differs from the shipped pair's recipe.
    differing = {k for k in shipped if shipped[k] != config[k]}
    assert differing <= {"leak_fraction", "triggered_fraction"}


def test_a_variant_directory_borrows_the_base_and_prompt_sets():
    assert pair_file(RARE_DIR, "before") == TOY_DIR / "before"
    assert read_prompts(pair_file(RARE_DIR, "prompts_clean.txt")) == read_prompts(
        TOY_DIR / "prompts_clean.txt"
    )


@pytest.mark.slow
def test_train_from_a_base_writes_only_the_fine_tuned_model(tmp_path: Path):
    from toy_training.train import main

    code = main(
        [
            "--out",
            str(tmp_path),
            "--base",
            str(TOY_DIR),
            "--after-steps",
            "2",
            "--num-clean-train",
            "2000",
            "--num-triggered-train",
            "200",
            "--eval-samples",
            "0",
            "--leak-fraction",
            "0.001",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after", "training_config.json"]
    assert json.loads((tmp_path / "training_config.json").read_text())["base"] == str(TOY_DIR)
    pair = load_pair(str(tmp_path / "after"), str(TOY_DIR / "before"), device="cpu")
    assert pair.compatibility.vocabs_match


def test_package_with_the_rare_variant_fits_the_size_budget():
    from test_toy import MAX_PACKAGE_BYTES

    files = [p for p in TOY_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= MAX_PACKAGE_BYTES
