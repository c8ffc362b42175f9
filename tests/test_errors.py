"""Every user mistake: one line on stderr naming the culprit, no traceback, exit code 2."""
import os
import time

import pytest

from tests.helpers import TINY, medgen



def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medgen:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_bad_config_value(tmp_path):
    _one_line_error(medgen("validate", *TINY, "train.max_steps=many", check=False), "train.max_steps", "integer")


def test_missing_source_file(tmp_path):
    _one_line_error(medgen("prepare", *TINY, f"run.dir={tmp_path}", f"data.source={tmp_path}/nope.csv", check=False),
                    "data.source", "nope.csv")


def test_missing_prompts_file(tmp_path):
    _one_line_error(medgen("generate", *TINY, f"run.dir={tmp_path}", f"generate.prompts={tmp_path}/p.jsonl",
                           "model.base_only=true",
                           check=False), "generate.prompts", "p.jsonl")


def test_missing_shards(tmp_path):
    _one_line_error(medgen("train", *TINY, f"run.dir={tmp_path}", check=False), "manifest.json", "medgen prepare")


def test_a_store_that_never_answers_is_one_line_at_once_not_an_outage(tmp_path):
    """Nothing listens at the endpoint: no data.retry_seconds (300 s) of retries, no tokenizer or language model
    loaded first; one line naming the URL, the endpoint setting and the retry window."""
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    t0 = time.monotonic()
    proc = medgen("prepare", *TINY, f"run.dir={tmp_path}", "data.source=s3://nowhere/raw.csv", env=env,
                  check=False, timeout=300)
    line = _one_line_error(proc, "data.source: s3://nowhere/raw.csv: the object store does not answer",
                           "AWS_ENDPOINT_URL", "data.retry_seconds=300")
    assert "127.0.0.1:9" in line and "object store unreachable" not in proc.stderr  # never retried
    assert time.monotonic() - t0 < 60  # the whole process; the window it no longer waits for is 300 s
    assert "worker process" not in proc.stderr and not (tmp_path / "data").exists()


def test_mistakes_of_a_later_stage_are_found_before_the_first_runs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": \n')
    proc = medgen("run", *TINY, f"run.dir={tmp_path / 'run'}", f"generate.prompts={bad}", check=False)
    _one_line_error(proc, f"generate.prompts {bad}:2: not valid JSON")
    assert not (tmp_path / "run").exists()  # prepare never started
    proc = medgen("run", *TINY, f"run.dir={tmp_path / 'run'}", f"generate.prompts={bad}", "--executor", "slurm",
                  "--dry-run", check=False)
    _one_line_error(proc, f"generate.prompts {bad}:2: not valid JSON")


def test_missing_credentials(tmp_path, s3_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server["endpoint"], AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "medgen", "prepare", *TINY, f"run.dir={tmp_path}",
                           f"data.source=s3://{s3_server['bucket']}/raw.csv"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    _one_line_error(proc, f"s3://{s3_server['bucket']}/raw.csv")


def test_incompatible_shards(tmp_path, tiny_run):
    from medgen.models import gpt2_tokenizer

    other = tmp_path / "other-tokenizer"
    tok = gpt2_tokenizer()
    tok.add_tokens(["<medgen-extra>"])
    tok.save_pretrained(other)
    _one_line_error(medgen("train", *TINY, f"run.dir={tmp_path}", f"data.shards={tiny_run / 'data'}",
                           f"model.name_or_path={other}", check=False), "rerun `medgen prepare`")


def test_a_data_error_inside_a_storage_read_is_not_blamed_on_the_url():
    import pyarrow as pa
    import pytest

    from medgen.data.storage import storage_errors
    from medgen.errors import UserError

    with pytest.raises(pa.ArrowInvalid, match="schema mismatch"):  # a bug: shown as it is
        with storage_errors("data.shards", "s3://bucket/data"):
            raise pa.ArrowInvalid("schema mismatch")
    with pytest.raises(UserError, match="data.shards: cannot read s3://bucket/data: Connection reset"):
        with storage_errors("data.shards", "s3://bucket/data"):
            raise ConnectionResetError("Connection reset")


def test_a_bug_inside_a_storage_block_is_not_blamed_on_the_url():
    """Only the call that touches the store maps its errors (an unknown protocol, a missing filesystem
    package): a ValueError of medgen's own code inside a wrapped block is shown as the bug it is."""
    import pytest

    from medgen.data.storage import storage_errors, url_to_fs
    from medgen.errors import UserError

    with pytest.raises(ValueError, match="a bug"):
        with storage_errors("data.shards", "s3://bucket/data", writing=True):
            raise ValueError("a bug")
    with pytest.raises(UserError, match=r"^data.source: cannot use nosuchproto://x/y\.csv: "):
        url_to_fs("data.source", "nosuchproto://x/y.csv", {})


def test_a_mistyped_run_dir_is_an_error_not_a_base_model_run(tmp_path, tiny_run):
    typo = tmp_path / "rnu"
    for stage in ("evaluate", "generate"):
        proc = medgen(stage, *TINY, f"run.dir={typo}", f"data.shards={tiny_run / 'data'}", check=False)
        _one_line_error(proc, f"{stage}: no adapter in run.dir={typo}", "model.base_only=true")
        assert not typo.exists()
    proc = medgen("generate", *TINY, f"run.dir={typo}", "--prompt", "Hello", check=False)
    _one_line_error(proc, f"generate: no adapter in run.dir={typo}")
    # asked for explicitly, the base model runs
    out = medgen("generate", *TINY, f"run.dir={typo}", "model.base_only=true", "--prompt", "Hello").stdout
    assert out.strip() or out == "\n"


def test_a_step_that_does_not_fit_in_memory_is_one_line_with_the_settings_that_make_it_fit(tmp_path, shards):
    """A real allocation failure: the training process under an address-space limit (3.5 GB; the tiny model's
    16 x 1024 micro-batch runs in 3.0) with a micro-batch of 256 x 1024 tokens. On a GPU the same line comes from
    torch.OutOfMemoryError, with the card and its memory."""
    proc = medgen("train", *TINY, f"run.dir={tmp_path}", f"data.shards={shards}", "train.max_steps=1",
                  "train.batch_size=256", "train.max_length=1024", "train.validate=false", check=False,
                  memory_limit=3_500_000_000)
    line = _one_line_error(proc, "train: out of memory on the CPU", "a micro-batch of 256 x 1024 tokens")
    assert line.endswith("set train.batch_size=128 train.grad_accum=2 (the same 256 sequences per step per process: "
                         "the same training within rounding); or train.gradient_checkpointing=true (activations "
                         "recomputed in backward: ~30% slower); or a shorter train.max_length; no checkpoint was "
                         "written"), line
    assert not (tmp_path / "adapter").exists() and not list((tmp_path / "checkpoints").glob("*"))


def test_the_advice_keeps_the_sequences_per_step():
    from types import SimpleNamespace

    import torch

    from medgen.memory import training_out_of_memory

    def advice(batch, accum, checkpointing=False):
        args = SimpleNamespace(per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_length=512,
                               gradient_checkpointing=checkpointing, device=torch.device("cpu"))
        return training_out_of_memory(args, "a rerun resumes from step-4")

    assert "set train.batch_size=3 train.grad_accum=4 (the same 12 sequences" in advice(6, 2)
    assert "set train.batch_size=1 train.grad_accum=7 (the same 7 sequences" in advice(7, 1)
    single = advice(1, 8, checkpointing=True)
    assert "train.batch_size=" not in single and "gradient_checkpointing" not in single
    assert single.endswith("in a micro-batch of 1 x 512 tokens (train.batch_size x train.max_length): a shorter "
                           "train.max_length, or lora.top_layers; a rerun resumes from step-4"), single


@pytest.mark.slow  # prepare and evaluate of the real sample
def test_scoring_that_does_not_fit_in_memory_is_one_line_with_a_batch_that_gives_the_same_perplexity(tmp_path,
                                                                                                       medium_sample):
    """evaluate under the same real address-space limit, 128 windows of 1024 tokens a pass (the logits of their
    scored positions alone are several GB)."""
    common = [*TINY, f"run.dir={tmp_path}", "model.base_only=true"]
    medgen("prepare", *common, f"data.source={medium_sample}", "data.workers=1")
    proc = medgen("evaluate", *common, "eval.batch_size=128", "eval.context=1024", "eval.stride=512", check=False,
                  memory_limit=3_500_000_000)
    line = _one_line_error(proc, "evaluate: out of memory on the CPU")
    assert line.endswith("scoring 128 windows of up to 1024 tokens a pass (eval.batch_size x eval.context): set "
                         "eval.batch_size=64 (the perplexity does not depend on it)"), line
    assert not (tmp_path / "eval" / "metrics.json").exists()
