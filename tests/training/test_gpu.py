"""Run on a CUDA machine (`pytest -m gpu`); skipped elsewhere."""

import pytest
import torch

from helpers import losses, run_cli, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_same_config_trains_on_cuda(method, tiny_phi3, chat_files, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        chat_files[0],
        out,
        method={"name": method, **({} if method == "full" else {"target_modules": ["all-linear", "lm_head"]})},
        validation=chat_files[1],
        max_steps=40,
        learning_rate=3e-3,
        eval_every=20,
    )
    assert run_cli("train", cfg) == 0
    trace = losses(out)
    assert sum(trace[-5:]) / 5 < 0.6 * trace[0]
