"""medgen: LoRA fine-tuning of GPT-2 on Medium articles as a distributed batch job."""
__version__ = "0.1.0"
