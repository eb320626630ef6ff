"""The Hugging Face hub as the project meets it: reachable, unreachable, or switched off by the user."""
import os


class HubUnreachableError(RuntimeError):
    """The Hugging Face hub could not be reached (no network, or offline mode)."""


def hub_offline() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline."""
    return any(os.environ.get(var, "").lower() in {"1", "true", "yes"} for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
