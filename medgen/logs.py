"""Logging for every entry point (the CLI and the SLURM tasks): one format, quiet libraries, and no
credential ever written out, whatever a library logs at debug level."""
from __future__ import annotations

import logging
import os
import warnings

# Environment variables whose values must never appear in a log line (botocore, for one, logs request
# headers, the access key among them, at debug level).
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
                    "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")
NOISY = ("transformers", "datasets", "accelerate", "peft", "trl", "DeepSpeed", "torch.distributed")


class RedactSecrets(logging.Filter):
    """Replaces the values of the credential variables in every record with '***'."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            clean = text
            for s in self.secrets:
                clean = clean.replace(s, "***")
            if clean != text:
                record.msg, record.args = clean, ()
        return True


def setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s medgen %(levelname)s %(message)s", datefmt="%H:%M:%S")
    redact = RedactSecrets([os.environ.get(v, "") for v in SECRET_VARIABLES])
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(redact)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if not debug:
        # known-noisy library messages; errors still surface
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
