"""An expert library: a folder of PEFT LoRA adapters with metadata and auxiliary data (mttl's ExpertLibrary).

Layout of `local://<root>`:
    <root>/library.json                        format marker
    <root>/experts/<name>/adapter_config.json  a PEFT adapter folder (loads in peft as it is)
    <root>/experts/<name>/adapter_model.safetensors
    <root>/experts/<name>/expert_info.json     task name(s), base model, training config
    <root>/experts/<name>/aux/<data_id>.safetensors + .json   per-expert data (Arrow prototypes)
    <root>/data/<data_id>.json                 library-level data (MBC clusters)

Every expert folder is written to a temp folder and renamed into place, so a crash mid-write never
leaves a half-written expert. `hf://user/repo` is read-only: it is downloaded (huggingface_hub) and
opened, or imported if it holds an mttl library (`.ckpt`/`.meta`); `clone` makes a local copy.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.adapters import ADAPTER_CONFIG, LoraFactors, SavedAdapter, load_adapter, lora_factors_from_state
from common.cli import UserError
from common.io import atomic_dir, load_tensors, read_json, save_tensors, write_json
from common.tiny_world import base_identity

FORMAT = {"format": "moerging.expert_library", "version": 1}
INFO = "expert_info.json"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots (mttl's rule) and no path separators
_PEFT_PREFIX = "base_model.model."


class LibraryError(UserError):
    """A missing expert, a bad library id, or an expert that does not fit the library."""


@dataclass
class ExpertInfo:
    """What an expert is (mttl's ExpertInfo): its name, the task(s) it was trained on, its base model."""

    expert_name: str
    expert_task_name: str
    base_model: str
    training_config: dict[str, Any] = field(default_factory=dict)
    source: str = "trained"  # "trained", "peft" (added from a PEFT folder) or "mttl" (imported)

    @property
    def task_names(self) -> list[str]:
        return [t for t in self.expert_task_name.split(",") if t]


@dataclass
class Expert:
    info: ExpertInfo
    adapter: SavedAdapter

    @property
    def name(self) -> str:
        return self.info.expert_name

    def factors(self) -> dict[str, LoraFactors]:
        """Model module name (no PEFT prefix) -> LoraFactors."""
        raw = lora_factors_from_state(self.adapter.state, self.adapter.config)
        return {k.removeprefix(_PEFT_PREFIX): v for k, v in raw.items()}


def same_base(a: str, b: str) -> bool:
    """Two base-model names for the same model (compared by folder / repo name; a tiny/micro/real spec by
    the name of the folder it resolves to, computed without building it)."""
    return base_identity(a) == base_identity(b)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise LibraryError(f"expert/data name {name!r} must be letters, digits, '_' or '-' (no dots, no '/')")
    return name


class ExpertLibrary:
    """A local expert library; `get_expert_library(id)` opens one by `local://` or `hf://` id."""

    def __init__(self, root: str | os.PathLike, *, create: bool = False, read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only
        marker = self.root / "library.json"
        if not marker.is_file():
            if not create:
                raise LibraryError(f"no expert library at {self.root} (no library.json); create it first")
            if self.root.exists() and any(self.root.iterdir()):
                raise LibraryError(f"{self.root} exists, is not empty and is not an expert library")
            write_json(marker, FORMAT)
        elif read_json(marker).get("format") != FORMAT["format"]:
            raise LibraryError(f"{marker} is not a moerging expert library marker")

    @staticmethod
    def get_expert_library(
        library_id: str, *, create: bool = False, destination_id: str | None = None
    ) -> ExpertLibrary:
        """mttl's spelling, `ExpertLibrary.get_expert_library(id)`, of the module's `get_expert_library`."""
        return get_expert_library(library_id, create=create, destination_id=destination_id)

    # -- listing -------------------------------------------------------------------------------
    def require_experts(self, purpose: str) -> list[str]:
        """The expert names, or a clear error when the library holds none (nothing to cluster or route)."""
        names = self.keys()
        if not names:
            raise LibraryError(
                f"library {self.root} holds no experts, so there is nothing for {purpose}; add experts "
                "first (`main.py train-expert` or `main.py library add`)"
            )
        return names

    def keys(self) -> list[str]:
        d = self.root / "experts"
        return sorted(p.name for p in d.iterdir() if (p / INFO).is_file()) if d.is_dir() else []

    def __contains__(self, name: str) -> bool:
        return name in self.keys()

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, name: str) -> Expert:
        return self.get_expert(name)

    def _dir(self, name: str) -> Path:
        if name not in self:
            from common.registry import close_matches

            raise LibraryError(f"no expert {name!r} in {self.root}.{close_matches(name, self.keys())}")
        return self.root / "experts" / name

    def info(self, name: str) -> ExpertInfo:
        return ExpertInfo(**read_json(self._dir(name) / INFO))

    def get_expert(self, name: str) -> Expert:
        return Expert(info=self.info(name), adapter=load_adapter(self._dir(name)))

    def base_model(self) -> str | None:
        names = self.keys()
        return self.info(names[0]).base_model if names else None

    # -- writing -------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise LibraryError(
                f"library {self.root} is read-only (a hub download): clone it to local:// first"
            )

    def add_adapter_dir(
        self, adapter_dir: str | os.PathLike, info: ExpertInfo, *, force: bool = False
    ) -> None:
        """Copy a PEFT adapter folder (ours or one trained elsewhere with peft) into the library, atomically."""
        self._writable()
        check_name(info.expert_name)
        adapter = load_adapter(adapter_dir)  # validates config, weights, finiteness
        if adapter.config.peft_type != "LORA":  # PeftType is a str enum
            raise LibraryError(
                f"{adapter_dir} is a {adapter.config.peft_type} adapter; the library holds LoRA"
            )
        lora_factors_from_state(adapter.state, adapter.config)  # rank/shape checks
        self._check_fits(adapter, info)
        dest = self.root / "experts" / info.expert_name
        if dest.exists() and not force:
            raise LibraryError(
                f"expert {info.expert_name!r} already in {self.root}; pass force=True to replace"
            )
        with atomic_dir(dest) as tmp:
            for f in Path(adapter_dir).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            write_json(tmp / INFO, asdict(info))  # written last: an expert without it is not listed

    def _check_fits(self, adapter: SavedAdapter, info: ExpertInfo) -> None:
        base = self.base_model()
        if base is not None and not same_base(base, info.base_model):
            raise LibraryError(
                f"expert {info.expert_name!r} is for base model {info.base_model!r}, library holds {base!r}"
            )
        recorded = getattr(adapter.config, "base_model_name_or_path", None)
        if recorded and not same_base(recorded, info.base_model):
            raise LibraryError(f"adapter was trained on base model {recorded!r}, not {info.base_model!r}")

    def remove_expert(self, name: str) -> None:
        self._writable()
        path = self._dir(name)
        (path / INFO).unlink()  # unlisted first, then deleted
        shutil.rmtree(path)

    # -- auxiliary data ------------------------------------------------------------------------
    def add_auxiliary(
        self, name: str, data_id: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> None:
        """Per-expert data (e.g. Arrow prototypes), safetensors beside a JSON config, each written atomically."""
        self._writable()
        aux = self._dir(name) / "aux"
        save_tensors(aux / f"{check_name(data_id)}.safetensors", tensors)
        write_json(aux / f"{data_id}.json", dict(config))

    def get_auxiliary(self, name: str, data_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        aux = self._dir(name) / "aux"
        if not (aux / f"{data_id}.json").is_file():
            return None
        return load_tensors(aux / f"{data_id}.safetensors"), read_json(aux / f"{data_id}.json")

    def put_data(self, data_id: str, obj: Mapping[str, Any]) -> None:
        self._writable()
        write_json(self.root / "data" / f"{check_name(data_id)}.json", dict(obj))

    def get_data(self, data_id: str) -> dict[str, Any] | None:
        path = self.root / "data" / f"{data_id}.json"
        return read_json(path) if path.is_file() else None

    # -- copies --------------------------------------------------------------------------------
    def clone(self, destination_id: str, *, force: bool = False) -> ExpertLibrary:
        """A local copy of this library at `local://path` (mttl's `library.clone`)."""
        scheme, dest = parse_library_id(destination_id)
        if scheme != "local":
            raise LibraryError(f"can only clone to local://, got {destination_id!r}")
        if Path(dest).exists() and not force:
            raise LibraryError(f"{dest} already exists; pass force=True to overwrite")
        with atomic_dir(dest) as tmp:
            shutil.copytree(self.root, tmp, dirs_exist_ok=True)
        return ExpertLibrary(dest)


def parse_library_id(library_id: str) -> tuple[str, str]:
    """'local://path' -> ('local', 'path'); 'hf://user/repo' -> ('hf', 'user/repo'); no prefix means hf (as mttl)."""
    scheme, sep, rest = str(library_id).partition("://")
    if not sep:
        if _looks_local(str(library_id)):
            raise LibraryError(
                f"library id {library_id!r} has no scheme, so it would be read as a hub repo id (as mttl does); "
                f"for the folder write local://{library_id}"
            )
        scheme, rest = "hf", str(library_id)
    if scheme not in ("local", "hf") or not rest:
        raise LibraryError(f"library id {library_id!r}: expected local://<path> or hf://<user>/<repo>")
    return scheme, rest


def _looks_local(library_id: str) -> bool:
    """A folder that exists, or a path a hub id can never be (absolute, ./, ~, or more than one '/')."""
    return (
        Path(library_id).expanduser().exists()
        or library_id.startswith(("/", ".", "~"))
        or library_id.count("/") > 1
    )


def get_expert_library(
    library_id: str, *, create: bool = False, destination_id: str | None = None
) -> ExpertLibrary:
    """Open (or with `create`, make) a library by id; `destination_id` clones it there first (as mttl)."""
    scheme, where = parse_library_id(library_id)
    if scheme == "local":
        lib = ExpertLibrary(where, create=create)
    else:
        lib = _from_hub(where)
    return lib.clone(destination_id) if destination_id else lib


def _from_hub(repo_id: str) -> ExpertLibrary:
    from huggingface_hub import snapshot_download

    from common.models.loading import hub_offline

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=hub_offline()))
    except Exception as e:  # offline, no such repo, no network: one clear message
        why = "this machine is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "it could not be downloaded"
        raise LibraryError(
            f"hf://{repo_id}: {why} ({type(e).__name__}); clone it to local:// on a machine with a network "
            f"(a library folder is named local://<path>, not {repo_id!r})"
        ) from e
    if (folder / "library.json").is_file():
        return ExpertLibrary(folder, read_only=True)
    if any(folder.glob("*.meta")):  # an mttl library: convert once into a local cache folder
        from projects.mbc_arrow.mttl_import import import_mttl_library

        dest = folder.parent / f".{folder.name}.moerging"
        return import_mttl_library(folder, f"local://{dest}") if not dest.exists() else ExpertLibrary(dest)
    if (folder / ADAPTER_CONFIG).is_file():
        raise LibraryError(f"hf://{repo_id} is a single PEFT adapter: add it with `main.py library add`")
    raise LibraryError(f"hf://{repo_id} holds neither an expert library nor an mttl library")
