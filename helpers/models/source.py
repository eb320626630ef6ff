"""A model name, resolved once: what it is, where its files are and which training checkpoints it has.

    source = resolve_model("toy-bilingual")      # ModelSource(kind="zoo", path=data/models/toy-bilingual, ...)
    source.is_toy                                # True: the notebooks assert their acceptance bars on it
    source.revisions                             # ("step0", "step20", ..., "step12000")
    model = load_model(source, device="cpu")     # the loader takes the resolved source as it takes a name

Every other module asks the `ModelSource` instead of classifying a name itself. Resolving reads nothing but folder
listings: a missing local model is refused here, before any loading, and nothing on disk is changed (a checkpoint a
killed save stranded is named, with the command that repairs it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from helpers.core import folders
from helpers.core.hub import HubUnreachableError, hub_offline
from helpers.models import zoo
from helpers.sources import realdata

Kind = Literal["zoo", "trained", "gguf", "local", "hub"]

PYTHIA_REVISIONS: tuple[str, ...] = (
    "step0", *(f"step{2 ** i}" for i in range(10)), *(f"step{1000 * k}" for k in range(1, 144)))
"""The training checkpoints every Pythia model has on the hub: step0, the powers of two to 512, then every 1,000
steps to 143,000 (154 in all)."""


class ModelNotFoundError(ValueError):
    """The name is neither a zoo model, a local checkpoint folder, nor reachable on the hub."""


@dataclass(frozen=True)
class ModelSource:
    """What a model name refers to.

    name: as the caller wrote it (it labels tables and keys caches).
    kind: "zoo" (a project toy), "trained" (a model that ships in a registry package, `realdata.TRAINED_MODELS`),
        "gguf" (a llama.cpp file), "local" (a Hugging Face folder) or "hub" (a hub id).
    path: the zoo or local folder, the GGUF file (for "trained", where it is fetched to); None for the hub.
    revisions: the training checkpoints it has, in training order: a toy's shipped ones, a Pythia model's on the
        hub; empty for any other model.
    """

    name: str
    kind: Kind
    path: Path | None
    revisions: tuple[str, ...] = ()

    @property
    def is_toy(self) -> bool:
        """One of the project's toys: the notebooks' acceptance bars are asserted on it and on nothing else."""
        return self.kind == "zoo"

    @property
    def toy(self) -> str | None:
        """The zoo's name of a toy, whether it was given by name or by its folder; None for any other model."""
        return self.path.name if self.kind == "zoo" else None

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"

    def revision_path(self, revision: str) -> Path:
        """The folder of training checkpoint `revision` of a toy (one of `revisions`)."""
        if self.kind != "zoo":
            raise ValueError(f"{self.name!r} ships no training checkpoints of its own; only the zoo's toys do")
        return zoo.revision_dir(self.toy, revision)

    def weight_files(self, revision: str | None = None) -> list[Path]:
        """The local weight files of the model (at `revision`), for cache keys: a retrained toy never reads its
        predecessor's entries. Empty for the hub, whose revisions are immutable names, and for a GGUF file (it has no
        training checkpoints to walk)."""
        if self.kind == "zoo":
            folder = self.revision_path(revision) if revision is not None else self.path
        elif self.kind == "local":
            folder = self.path
        else:
            return []
        return sorted(folder.glob("*.safetensors"))


def resolve_model(name: str | Path | ModelSource) -> ModelSource:
    """Resolve a model name once. Accepts a zoo name (`toy-bilingual`) or a zoo folder, a registry-packaged trained
    model (`smollm2-135m-instruct`), a `.gguf` file, a Hugging Face checkpoint folder, or a hub id
    (`EleutherAI/pythia-70m`). Raises `ModelNotFoundError` for a local model that is not there, and
    `HubUnreachableError` for a hub id while the hub is switched off (`HF_HUB_OFFLINE`)."""
    if isinstance(name, ModelSource):
        return name
    text = str(name)
    if text in realdata.TRAINED_MODELS:
        return ModelSource(text, "trained", realdata.model_file(text))
    path = Path(text).expanduser()
    if text.endswith(".gguf") and path.is_file():
        return ModelSource(text, "gguf", path.resolve())
    if zoo.is_zoo_name(text) or path.is_dir() and path.resolve().parent == zoo.MODELS_DIR.resolve() \
            and path.name in zoo.ZOO:
        return _zoo_source(text, path.name if path.is_dir() else text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json (a Hugging Face checkpoint)")
        return ModelSource(text, "local", path.resolve())
    if text.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelNotFoundError(f"no checkpoint folder at {text!r} (the path does not exist or is not a folder)")
    if text.startswith("toy-") or "/" not in text and hub_offline():
        raise ModelNotFoundError(f"unknown model {text!r}. The project's zoo has: {', '.join(zoo.names())}")
    if hub_offline():
        raise HubUnreachableError(
            f"{text!r} would come from the Hugging Face hub, but offline mode is on (HF_HUB_OFFLINE). "
            f"Run offline with a zoo model ({', '.join(zoo.names())}) or a local checkpoint folder.")
    pythia = text.lower().startswith("eleutherai/pythia")
    return ModelSource(text, "hub", None, PYTHIA_REVISIONS if pythia else ())


def _zoo_source(text: str, toy: str) -> ModelSource:
    folder = zoo.checkpoint_dir(toy)
    left = folders.stranded(folder)
    if left is not None:
        raise ModelNotFoundError(f"zoo model {toy!r}: a killed save left its checkpoint at {left}; put it back "
                                 f"with: python -m helpers.models.zoo repair {toy}")
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"zoo model {toy!r} has no checkpoint at {folder}; rebuild it with: "
            f"python -m helpers.models.zoo train {toy}")
    return ModelSource(text, "zoo", folder, tuple(zoo.revisions(toy)))
