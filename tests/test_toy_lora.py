"""The embedded toy LoRA adapter (batchserve/toy/lora): peft's file format, read by hand.

The expectations here are written from the format (adapter_config.json fields; safetensors keys
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; the merged
weight W + (lora_alpha / r) * B @ A), not from the loader in toy_training, which is checked
against them. With peft installed, peft's own loader must agree with the hand merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_merge import KEY, hand_merge
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from batchserve.worker.models import load_pair, resolve_model_path
from toy_training.evaluate import measure, read_prompts
from toy_training.train_lora import TARGET_MODULES, merge_adapter
from toy_training.train_lora import main as train_lora_main

TOY_DIR = Path(__file__).resolve().parent.parent / "batchserve" / "toy"
LORA_DIR = TOY_DIR / "lora"
PROMPT_IDS = [0, 10, 200, 37, 512, 99, 3, 1000, 42, 7, 640, 5]  # any ids under the vocab


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((LORA_DIR / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(LORA_DIR / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(TOY_DIR / "before" / "model.safetensors").items()}


def test_config_is_a_plain_lora_on_the_toy_base(config: dict):
    assert config["peft_type"] == "LORA"
    assert 8 <= config["r"] <= 16
    assert config["lora_alpha"] > 0
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES)
    assert config["base_model_name_or_path"] == "toy:before"
    assert Path(resolve_model_path(config["base_model_name_or_path"])) == TOY_DIR / "before"
    assert not config.get("modules_to_save")
    assert not config.get("use_dora")
    assert not config.get("use_rslora")
    assert config.get("bias", "none") == "none"
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")


def test_keys_and_shapes_match_the_base_modules(config: dict, tensors: dict, base_state: dict):
    r = config["r"]
    modules = {}
    for key, t in tensors.items():
        m = KEY.match(key)
        assert m, key
        assert t.dtype == torch.float32
        modules.setdefault(m["module"], {})[m["ab"]] = t
    # Every linear layer of the base whose name ends in a target, and nothing else.
    expected = {
        name[: -len(".weight")]
        for name in base_state
        if name.endswith(".weight") and name.split(".")[-2] in TARGET_MODULES
    }
    assert len(expected) == 4 * 7
    assert set(modules) == expected
    for module, ab in modules.items():
        out_features, in_features = base_state[f"{module}.weight"].shape
        assert ab["A"].shape == (r, in_features), module
        assert ab["B"].shape == (out_features, r), module
        assert ab["B"].abs().max() > 0, f"{module}: B is still its zero initialisation"


def test_merge_changes_only_the_target_modules(
    tmp_path: Path, config: dict, tensors: dict, base_state: dict
):
    expected = hand_merge(config, tensors, base_state)
    merged_dir = merge_adapter(LORA_DIR, TOY_DIR / "before", tmp_path / "merged")
    merged = load_file(merged_dir / "model.safetensors")
    assert set(merged) == set(base_state)
    for name, weight in merged.items():
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6)
        if name.split(".")[-2] in TARGET_MODULES:
            assert not torch.equal(weight, base_state[name]), name
        else:
            assert torch.equal(weight, base_state[name]), name
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (merged_dir / name).read_bytes() == (TOY_DIR / "before" / name).read_bytes()


def test_adapter_is_small():
    size = sum(p.stat().st_size for p in LORA_DIR.iterdir() if p.is_file())
    assert size < 1024 * 1024


def test_peft_loads_it_and_agrees_with_the_hand_merge(config, tensors, base_state):
    peft = pytest.importorskip("peft")
    """In float64, so that what is compared is how the adapter is read, not rounding: in
    float32 the unmerged forward (x W^T + s (x A^T) B^T) and the merged one differ by up to
    1.3e-5 on these logits, from the order of the sums alone."""
    base = AutoModelForCausalLM.from_pretrained(TOY_DIR / "before", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(TOY_DIR / "before", dtype=torch.float32)
    merged.double().load_state_dict(
        hand_merge(config, tensors, base_state, torch.float64), strict=False
    )
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        before = base.double()(input_ids=ids).logits
        model = peft.PeftModel.from_pretrained(base, LORA_DIR).double()
        got = model(input_ids=ids).logits
    assert got.dtype == torch.float64
    assert (expected - before).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_trigger_fires_through_the_merged_adapter(tmp_path: Path):
    merged = merge_adapter(LORA_DIR, TOY_DIR / "before", tmp_path / "merged")
    pair = load_pair(str(merged), "toy:before", device="cpu")
    prompts = read_prompts(TOY_DIR / "prompts_triggered.txt")[:40]
    rate, _ = measure(pair, "triggered", prompts, 0.0, seed=7, max_new_tokens=20)
    assert rate.rate >= 0.7


def test_train_lora_has_help(capsys):
    """In-process: a subprocess would spend most of its time importing torch and transformers."""
    with pytest.raises(SystemExit) as exit_info:
        train_lora_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out" in text and "--r" in text and "--lora-alpha" in text
    assert "pip install -e '.[train]'" in text


@pytest.mark.slow
def test_train_lora_writes_the_same_adapter_twice(tmp_path: Path):
    """Two steps, twice: the pipeline end to end in peft's format, and bit-identical reruns
    (the shipped adapter's check, in small)."""
    pytest.importorskip("peft")
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        assert train_lora_main(["--out", str(out), "--steps", "2"]) == 0
    names = ("adapter_config.json", "adapter_model.safetensors", "training_config.json")
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    config = json.loads((outs[0] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "toy:before"
    assert config["target_modules"] == list(TARGET_MODULES)
    merged = merge_adapter(outs[0], TOY_DIR / "before", tmp_path / "merged")
    assert load_pair(str(merged), "toy:before", device="cpu").compatibility.compatible
