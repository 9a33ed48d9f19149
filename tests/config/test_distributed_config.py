"""Distributed settings that cannot work are refused before any process or model starts."""

import json

import pytest

from phitune.config import parse_config
from phitune.errors import PhituneError
from phitune.training.distributed import deepspeed_config

from helpers import run_cli, write_config


def _cfg(tmp_path, tiny_phi3, chat_files, **distributed):
    raw = {
        "model": str(tiny_phi3),
        "data": str(chat_files[0]),
        "training": {"batch_size": 8},
        "distributed": distributed,
    }
    return parse_config(raw)


@pytest.mark.parametrize(
    "distributed, message",
    [
        ({"strategy": "deepspeed", "zero_stage": 2, "offload_params": "cpu"}, "parameter offload needs zero_stage 3"),
        (
            {"strategy": "deepspeed", "zero_stage": 0, "offload_optimizer": "cpu"},
            "optimizer offload needs zero_stage 1, 2 or 3",
        ),
        ({"strategy": "ddp", "offload_optimizer": "cpu"}, "only applies with distributed.strategy: deepspeed"),
        (
            {"strategy": "deepspeed", "zero_stage": 3, "deepspeed_config": "nope.json"},
            "distributed.deepspeed_config: file not found",
        ),
        ({"strategy": "deepspeed", "zero_stage": 4}, "distributed.zero_stage"),
    ],
)
def test_impossible_combinations_are_refused(tmp_path, tiny_phi3, chat_files, distributed, message):
    with pytest.raises(PhituneError) as exc:
        _cfg(tmp_path, tiny_phi3, chat_files, **distributed)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "distributed, message",
    [
        ({"strategy": "deepspeed", "zero_stage": 3}, "qlora with ZeRO-3 is not supported"),
        ({"strategy": "fsdp"}, "qlora under fsdp is not supported"),
    ],
)
def test_qlora_with_sharded_parameters_is_refused(tmp_path, tiny_phi3, chat_files, distributed, message):
    raw = {"model": str(tiny_phi3), "method": "qlora", "data": str(chat_files[0]), "distributed": distributed}
    with pytest.raises(PhituneError, match=message):
        parse_config(raw)


def test_user_deepspeed_json_is_merged_and_conflicts_name_both_values(tmp_path, tiny_phi3, chat_files):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "zero_optimization": {"stage": 3, "overlap_comm": True},
                "communication_data_type": "fp32",
            }
        )
    )
    cfg = _cfg(tmp_path, tiny_phi3, chat_files, strategy="deepspeed", zero_stage=3, deepspeed_config=str(user))
    merged = deepspeed_config(cfg, world=2)
    assert merged["train_batch_size"] == 8 and merged["train_micro_batch_size_per_gpu"] == 4
    assert (
        merged["zero_optimization"] == {"stage": 3, "overlap_comm": True}
        and merged["communication_data_type"] == "fp32"
    )
    user.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}))
    with pytest.raises(PhituneError) as exc:
        deepspeed_config(cfg, world=2)
    assert "gradient_clipping is 0.5 but the phitune config gives 1.0" in str(exc.value)
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(PhituneError, match="phitune sets precision itself"):
        deepspeed_config(cfg, world=2)


def test_batch_that_processes_cannot_share_fails_before_launch(tmp_path, tiny_phi3, chat_files, capsys):
    cfg = write_config(
        tmp_path / "c.yaml", tiny_phi3, chat_files[0], tmp_path / "out", batch_size=6, gradient_accumulation_steps=2
    )
    assert run_cli("train", cfg, "--nproc", "2") == 2
    err = capsys.readouterr().err
    assert (
        "training.batch_size: 6 examples cannot be shared by 2 processes x 2 accumulation steps; make it a multiple "
        "of 4" in err
    )
    assert not (tmp_path / "out").exists()
