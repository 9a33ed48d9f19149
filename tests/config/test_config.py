import pytest

from phitune.config import load_config, parse_config, reference_markdown
from phitune.errors import PhituneError

from helpers import REPO, run_cli


def _cfg(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_config_with_shorthands(tmp_path, tiny_phi3, chat_files):
    train, val = chat_files
    p = _cfg(
        tmp_path,
        f"model: {tiny_phi3}\nmethod: dora\ndata: {{train: {train}, validation: {val}}}\n"
        "training: {max_steps: 200, learning_rate: 2.0e-4, batch_size: 8, save_every: 50, log_every: 1}\n"
        "output_dir: runs/first\n",
    )
    cfg = load_config(p)
    assert cfg.model.name_or_path == str(tiny_phi3)
    assert cfg.method.name == "dora" and cfg.method.r == 16 and cfg.method.target_modules == "all-linear"
    assert cfg.data.validation == str(val)
    assert cfg.training.max_steps == 200 and cfg.training.save_every == 50


def test_bare_on_off_mean_the_words_not_booleans(tmp_path, tiny_phi3, chat_files):
    # YAML 1.1 reads `on` / `off` as true / false, in a file and in --set alike.
    p = _cfg(tmp_path, f"model: {tiny_phi3}\ndata: {{train: {chat_files[0]}, packing: on, group_by_length: off}}\n")
    cfg = load_config(p, ["training.tensorboard=off"])
    assert (cfg.data.packing, cfg.data.group_by_length, cfg.training.tensorboard) == ("on", "off", "off")
    cfg = load_config(p, ["data.packing=off", "data.group_by_length=on"])
    assert (cfg.data.packing, cfg.data.group_by_length) == ("off", "on")
    with pytest.raises(PhituneError, match="data.packing"):
        load_config(p, ["data.packing=sometimes"])


def test_unknown_key_suggests_closest_and_names_line(tmp_path, tiny_phi3, chat_files):
    p = _cfg(tmp_path, f"model: {tiny_phi3}\ndata: {chat_files[0]}\ntraining:\n  lerning_rate: 0.1\n")
    with pytest.raises(PhituneError) as exc:
        load_config(p)
    text = str(exc.value)
    assert f"{p}:4: training.lerning_rate: unknown key; did you mean 'learning_rate'?" in text


def test_all_problems_reported_together(tmp_path, tiny_phi3):
    p = _cfg(
        tmp_path,
        f"model: {{name_or_path: {tiny_phi3}, dtyp: float32}}\nmethod: {{name: lorra, r: -1}}\n"
        "data: {train: x.jsonl}\ntraining: {batch_size: 0, optimiser: adamw}\nouput_dir: x\n",
    )
    with pytest.raises(PhituneError) as exc:
        load_config(p)
    problems = exc.value.problems
    joined = "\n".join(problems)
    assert "model.dtyp: unknown key; did you mean 'dtype'?" in joined
    assert "method.name" in joined and "lorra" in joined
    assert "method.r" in joined and "greater than 0" in joined
    assert "training.batch_size" in joined
    assert "training.optimiser: unknown key; did you mean 'optimizer'?" in joined
    assert "ouput_dir: unknown section; did you mean 'output_dir'?" in joined
    assert "data.train: file not found: x.jsonl" in joined  # checked even though other sections failed
    assert len(problems) >= 7


def test_semantic_problems_are_collected(tmp_path, chat_files):
    p = _cfg(
        tmp_path,
        "model: ./no/such/model\ndata: {train: missing.jsonl}\n"
        "training: {max_steps: 5, epochs: 2, batch_size: 6, gradient_accumulation_steps: 4, eval_every: 2}\n",
    )
    with pytest.raises(PhituneError) as exc:
        load_config(p)
    joined = "\n".join(exc.value.problems)
    assert "model directory not found: ./no/such/model; create one with `phitune create-model" in joined
    assert "data.train: file not found: missing.jsonl" in joined
    assert "set either training.max_steps (5) or training.epochs (2), not both" in joined
    assert "batch_size 6 is not divisible by gradient_accumulation_steps 4" in joined
    assert "training.eval_every: needs a validation set" in joined


def test_a_method_key_its_method_does_not_read_is_an_error(tmp_path, tiny_phi3, chat_files):
    """{name: ia3, r: 64} would train IA3 and ignore r: refused, naming the key and its methods;
    a dumped config of every method loads again (it holds only the keys its method reads)."""
    from phitune.config import dump_config
    from phitune.methods import METHODS

    p = _cfg(
        tmp_path, f"model: {tiny_phi3}\ndata: {{train: {chat_files[0]}}}\nmethod: {{name: ia3, r: 64, fused: false}}\n"
    )
    with pytest.raises(PhituneError) as exc:
        load_config(p)
    joined = "\n".join(exc.value.problems)
    assert "method.r: not read by method ia3; it applies to lora, dora, qlora" in joined
    assert "method.fused: not read by method ia3; it applies to lora" in joined and len(exc.value.problems) == 2
    # A config written whole by an earlier phitune (every key, at its default) still loads.
    whole = f"model: {tiny_phi3}\ndata: {{train: {chat_files[0]}}}\nmethod: {{name: ia3, r: 16, fused: true}}\n"
    assert load_config(_cfg(tmp_path, whole)).method.name == "ia3"
    for name in METHODS:
        cfg = parse_config({"model": str(tiny_phi3), "data": str(chat_files[0]), "method": name}, source="t")
        again = tmp_path / f"{name}.yaml"
        again.write_text(dump_config(cfg))
        assert load_config(again).method == cfg.method


def test_set_overrides_and_shorthand(tmp_path, tiny_phi3, chat_files):
    p = _cfg(tmp_path, f"model: {tiny_phi3}\ndata: {chat_files[0]}\n")
    cfg = load_config(
        p,
        [
            "training.learning_rate=1e-3",
            "method=qlora",
            "method.target_modules=[qkv_proj, o_proj]",
            "model.dtype=bfloat16",
            "training.max_grad_norm=null",
            "training.tensorboard=off",
        ],
    )
    assert cfg.training.learning_rate == 1e-3
    assert cfg.method.name == "qlora"
    assert cfg.method.target_modules == ["qkv_proj", "o_proj"]
    assert cfg.model.dtype == "bfloat16" and cfg.model.name_or_path == str(tiny_phi3)
    assert cfg.training.max_grad_norm is None
    assert cfg.training.tensorboard == "off"  # YAML reads a bare `off` as false
    with pytest.raises(PhituneError, match="expected section.key=value"):
        load_config(p, ["training.learning_rate"])


def test_invalid_yaml_names_the_line(tmp_path):
    p = _cfg(tmp_path, "model: x\ndata: [unclosed\n")
    with pytest.raises(PhituneError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(p)


def test_cli_config_error_is_one_message_exit_2(tmp_path, capsys, tiny_phi3, chat_files):
    p = _cfg(tmp_path, f"model: {tiny_phi3}\ndata: {chat_files[0]}\ntraining: {{lerning_rate: 1}}\n")
    assert run_cli("train", p) == 2
    err = capsys.readouterr().err
    assert err.startswith("phitune: error: ") and "did you mean 'learning_rate'" in err
    assert "Traceback" not in err


def test_every_field_is_in_the_manuals_config_reference():
    page = (REPO / "docs" / "reference" / "config.md").read_text()
    for line in reference_markdown().splitlines()[2:]:
        key = line.split("`")[1]
        assert f"`{key}`" in page, f"{key} missing from docs/reference/config.md (python scripts/docs_reference.py)"


def test_shipped_example_configs_parse(monkeypatch):
    import yaml

    monkeypatch.chdir(REPO)
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        raw = yaml.safe_load(path.read_text())
        # The model directory is created by the quickstart; everything else must be valid as shipped.
        try:
            parse_config(raw, source=str(path), text=path.read_text())
        except PhituneError as exc:
            others = [p for p in exc.problems if "model directory not found" not in p]
            assert not others, others


def test_a_model_path_under_home_is_expanded(tmp_path, monkeypatch):
    from phitune.config import parse_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "m").mkdir(parents=True)
    train = tmp_path / "t.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    cfg = parse_config({"model": "~/models/m", "data": str(train)}, source="t")
    assert cfg.model.name_or_path == str(tmp_path / "models" / "m")
