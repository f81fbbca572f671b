"""Test-run environment, set before anything imports huggingface_hub.

Tests and notebooks run offline, quietly, on the default model; notebook
kernels started by nbval inherit this environment.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("LLAMA_LAB_MODEL", None)

# Each notebook's wall time and kernel peak, recorded in notebooks/budgets.json (tests/nb_budgets.py).
pytest_plugins = ["tests.nb_budgets"]
