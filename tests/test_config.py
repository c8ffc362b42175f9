import yaml

from medgen import config
from medgen.errors import ConfigError
from tests.helpers import ROOT, medgen

import pytest


def test_defaults_are_valid():
    cfg = config.load_config()
    assert cfg.model.name_or_path == "smollm2-135m"
    assert cfg.shards_url.endswith("runs/demo/data")


def test_yaml_and_overrides_are_typed():
    cfg = config.load_config(str(ROOT / "configs/tiny.yaml"), [
        "train.max_steps=7", "train.learning_rate=5e-4", "lora.target_modules=[c_attn]", "data.shards=s3://b/x",
        "generate.do_sample=true",
    ])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.learning_rate == pytest.approx(5e-4)
    assert cfg.lora.target_modules == ["c_attn"]
    assert cfg.shards_url == "s3://b/x"
    assert cfg.generate.do_sample is True
    assert cfg.model.name_or_path == "tiny-gpt2"  # from the YAML


def test_every_problem_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "train": {"max_stepz": 3, "batch_size": "four"},
        "data": {"source": str(tmp_path / "missing.csv")},
    }))
    with pytest.raises(ConfigError) as e:
        config.load_config(str(bad))
    text = "\n".join(e.value.problems)
    assert "train.max_stepz: unknown key" in text
    assert "train.batch_size: must be an integer" in text
    assert "data.source: file not found" in text


def test_cli_reports_three_mistakes_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "train": {"max_stepz": 3, "batch_size": "four"},
        "data": {"source": str(tmp_path / "missing.csv")},
    }))
    proc = medgen("validate", "--config", str(bad), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert any("max_stepz" in ln and "unknown key" in ln for ln in lines)
    assert any("train.batch_size" in ln and "integer" in ln for ln in lines)
    assert any("data.source" in ln and "missing.csv" in ln for ln in lines)
    assert "Traceback" not in proc.stderr


def test_validate_prints_the_resolved_config():
    proc = medgen("validate", "--config", "configs/tiny.yaml", "train.max_steps=3")
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["train"]["max_steps"] == 3
    assert resolved["model"]["name_or_path"] == "tiny-gpt2"
    assert resolved["eval"]["stride"] == 64


def test_bad_override_syntax_and_values():
    with pytest.raises(ConfigError) as e:
        config.load_config(None, ["train.max_steps", "eval.split=dev", "eval.stride=1000", "eval.context=10"])
    text = "\n".join(e.value.problems)
    assert "expected section.key=value" in text
    assert "eval.split: must be one of train, validation, test" in text


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config.config_doc() in readme, "README's configuration reference is stale: run `make docs` and paste docs/config.md"


def test_names_only_a_stage_knows_are_checked_by_validate():
    with pytest.raises(ConfigError) as e:
        config.load_config(str(ROOT / "configs/tiny.yaml"), [
            "data.clean_rules=[html, nonsense]", "data.languages=[en, english]", "lora.top_layers=3",
            "train.sft_args={learning_rate: 0.1, ignore_data_skip: false, torch_compile: false, adam_beta2: 0.99}"])
    assert e.value.problems == [
        "data.clean_rules: unknown rule 'nonsense' (known: html, image_credits, urls, emails, mentions, emoji, "
        "special_chars, whitespace)",
        e.value.problems[1],
        "train.sft_args.learning_rate: medgen sets this itself; use train.learning_rate",
        "train.sft_args.ignore_data_skip: medgen sets this itself (exact resume and the packed data stream rely on it)",
        "train.sft_args.torch_compile: medgen sets this itself; use train.compile",
        "lora.top_layers: 3 is more than the 2 layers of tiny-gpt2",
    ]
    assert e.value.problems[1].startswith("data.languages: unknown language code 'english'; use ISO 639-1 codes")
    config.load_config(str(ROOT / "configs/tiny.yaml"), ["lora.top_layers=2", "train.sft_args={adam_beta2: 0.99}"])


def test_credentials_in_storage_options_are_refused_without_echoing_them():
    with pytest.raises(ConfigError) as e:
        config.load_config(str(ROOT / "configs/tiny.yaml"),
                           ["data.storage_options={client_kwargs: {aws_secret_access_key: s3cr3t}, anon: false}"])
    assert [p.split(":")[0] for p in e.value.problems] == ["data.storage_options.client_kwargs.aws_secret_access_key"]
    assert "s3cr3t" not in str(e.value) and "set them in the environment" in str(e.value)


def test_transformers_names_are_checked_by_validate():
    with pytest.raises(ConfigError) as e:
        config.load_config(str(ROOT / "configs/tiny.yaml"), ["train.lr_scheduler=cosin"])
    assert e.value.problems[0].startswith("train.lr_scheduler: unknown schedule 'cosin'; did you mean cosine? (known: ")
    assert config.load_config(None, ["train.lr_scheduler=constant_with_warmup"]).train.lr_scheduler == "constant_with_warmup"
    with pytest.raises(ConfigError) as e:
        config.load_config(None, ["train.max_step=5"])
    assert e.value.problems[0].startswith("train.max_step: unknown key (did you mean train.max_steps? known: ")
