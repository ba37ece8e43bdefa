"""``ncpvae export``: a trained run as a self-describing folder to share, loaded without pickle.

::

    <export>/
      README.md              model card: headline numbers, how the run was made, how to load it
      config.toml            the run's resolved config (``ncpvae train config.toml`` repeats it)
      model.safetensors      the model's state dict (tensors)
      prior.safetensors      the prior's state dict (tensors)
      state.json             non-tensor entries of the two state dicts (usually empty)
      plugins.json           the plugins (and their versions) that built the run
      summary.json           the run's summary; evaluation.json when the run was evaluated
      ncpvae_export.json     the manifest: format, ncpvae version, image shape, SHA-256 per file

Weights are safetensors (a flat name -> tensor file that loads without running code); the
manifest's digests are checked when the folder is loaded (:func:`load_weights`), so a damaged
or edited file is refused with one line. ``ncpvae.open_run(EXPORT)`` builds the model and prior
from config.toml and the image shape of the manifest, so the dataset need not exist where the
export is opened. :func:`push_to_hub` uploads the folder with ``huggingface_hub`` (extra
``[hub]``).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ncpvae.component import BuildContext
from ncpvae.config import load_config
from ncpvae.errors import ConfigError, DataError, NcpvaeError
from ncpvae.factory import build_component
from ncpvae.io import atomic_write, read_json, to_plain_json, write_json, write_text
from ncpvae.registry import Registry
from ncpvae.run import progress
from ncpvae.run.checkpoint import read_checkpoint
from ncpvae.run.directory import RunDirectory
from ncpvae.run.summary_text import format_run_summary

__all__ = ["Manifest", "export_run", "is_export", "load_weights", "push_to_hub",
           "read_manifest"]

MANIFEST = "ncpvae_export.json"
EXPORT_FORMAT = 1
MODEL_WEIGHTS = "model.safetensors"
PRIOR_WEIGHTS = "prior.safetensors"
EXTRA_STATE = "state.json"
MODEL_CARD = "README.md"
#: the run's files copied as they are (evaluation.json only when the run has one)
COPIED = ("config.toml", "plugins.json", "summary.json", "evaluation.json")


@dataclass(frozen=True)
class Manifest:
    """What ``ncpvae_export.json`` records."""

    format: int
    ncpvae_version: str
    image_shape: tuple[int, int, int]
    files: dict[str, str]  # file name -> SHA-256 hex digest


def is_export(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> Manifest:
    data = read_json(path / MANIFEST, "export manifest")
    try:
        manifest = Manifest(int(data["format"]), str(data["ncpvae_version"]),
                            tuple(int(v) for v in data["image_shape"]),  # type: ignore[arg-type]
                            {str(k): str(v) for k, v in data["files"].items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"'{path / MANIFEST}' is not an ncpvae export manifest") from None
    if manifest.format != EXPORT_FORMAT:
        raise DataError(f"'{path}' is an export of format {manifest.format}; this ncpvae reads "
                        f"format {EXPORT_FORMAT}")
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise NcpvaeError("exported weights need the 'safetensors' package: "
                          "pip install safetensors") from None
    return safetensors.torch


# ---------------------------------------------------------------------------------------------
# writing


def _split_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A state dict as (tensors, the rest): safetensors holds only tensors, each its own
    contiguous CPU copy (shared storage is not allowed there)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()
               if isinstance(v, Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    plain = to_plain_json(rest)
    try:
        json.dumps(plain, allow_nan=False)
    except (TypeError, ValueError):
        raise NcpvaeError("the run's state holds non-tensor values that are not plain data "
                          f"({', '.join(sorted(rest))}); it cannot be exported") from None
    return tensors, plain


def _image_shape(config: Any, registry: Registry | None) -> tuple[int, int, int]:
    """The run's image shape, from its dataset (the export records it: the dataset need not
    exist where the export is opened)."""
    ctx = BuildContext(latent_dim=config.latent_dim, seed=config.seed, registry=registry)
    with torch.random.fork_rng(devices=[]):  # a dataset may draw from the global RNG
        return tuple(build_component(config.data, "dataset", ctx).build(ctx).image_shape)  # type: ignore[return-value]


def export_run(run_path: str | Path, out: str | Path, *, overwrite: bool = False,
               registry: Registry | None = None) -> Path:
    """Write the finished run ``run_path`` as an export folder ``out`` (see the module
    docstring); return ``out``. An existing non-empty ``out`` is refused unless it is an earlier
    export and ``overwrite`` is given. The run itself is only read."""
    from ncpvae import __version__

    directory = RunDirectory(Path(run_path))
    if not directory.config.is_file():
        raise NcpvaeError(f"'{directory.path}' is not a ncpvae run directory (no config.toml)")
    progress.require_finished(directory, "export")
    out = Path(out)
    run = directory.path.resolve()
    if out.resolve() == run or run in out.resolve().parents:
        raise ConfigError(f"export into '{out}': choose a folder outside the run")
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not (overwrite and is_export(out)):
        raise ConfigError(f"'{out}' already exists and is not empty; choose another folder"
                          + (" or pass --overwrite" if is_export(out) else ""))
    config = load_config(directory.config, (), registry)
    state = read_checkpoint(directory.checkpoint)
    st = _safetensors()
    model_tensors, model_rest = _split_state(state["model"])
    prior_tensors, prior_rest = _split_state(state["prior"])
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "ncpvae_export": str(EXPORT_FORMAT)}
    atomic_write(out / MODEL_WEIGHTS, lambda f: f.write(st.save(model_tensors, meta)),
                 binary=True)
    atomic_write(out / PRIOR_WEIGHTS, lambda f: f.write(st.save(prior_tensors, meta)),
                 binary=True)
    write_json(out / EXTRA_STATE, {"model": model_rest, "prior": prior_rest})
    for name in COPIED:
        if (directory.path / name).is_file():
            atomic_write(out / name, lambda f, n=name: f.write((directory.path / n).read_bytes()),
                         binary=True)
        else:
            (out / name).unlink(missing_ok=True)  # an earlier export's, not this run's
    write_text(out / MODEL_CARD, model_card(directory, out, config))
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST
                   and not p.name.startswith("."))
    write_json(out / MANIFEST, {
        "format": EXPORT_FORMAT, "ncpvae_version": __version__,
        "image_shape": list(_image_shape(config, registry)),
        "checkpoint_stage": state.get("stage"),
        "exported": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "files": {name: _sha256(out / name) for name in files}})
    return out


def model_card(directory: RunDirectory, out: Path, config: Any) -> str:
    """The export's README.md: what the run is, its headline numbers, how it was made and
    how to load it (front matter for the Hugging Face Hub)."""
    from ncpvae import __version__

    plugins = read_json(directory.plugins, "plugins") if directory.plugins.is_file() else []
    headline = format_run_summary(directory.path).splitlines()
    headline = [line for line in headline[1:] if not line.strip().startswith("report:")]
    tags = ["ncpvae", "vae", "latent-prior", config.prior.name, config.data.name]
    sampled = f", sampled with `{config.sampler.name}`" if config.sampler else ""
    rows = "\n".join(f"| {p['name']} | {p['source']} | {p['version']} |" for p in plugins)
    return f"""---
library_name: ncpvae
tags: [{", ".join(dict.fromkeys(tags))}]
---

# ncpvae run `{config.name}`

A VAE (model `{config.model.name}`, latent size {config.latent_dim}) trained on `{config.data.name}` \
with the `{config.objective.name}` objective, and its latent prior `{config.prior.name}`{sampled}; \
exported by ncpvae {__version__}.

## Headline numbers

```text
{chr(10).join(headline) if headline else "(the run recorded no numbers)"}
```

summary.json and evaluation.json hold every number of the run.

## How it was made

```bash
ncpvae train config.toml
```

config.toml is the run's resolved config (seed {config.seed}); it repeats the run with the
plugins listed below.

## How to use it

```python
import ncpvae

run = ncpvae.open_run("{out.name}")  # this folder: weights from safetensors, no pickle
draw = run.sample(16, seed=0)  # draw.latents (16, {config.latent_dim}), draw.images (16, C, H, W)
enc = run.encode(draw.images)  # enc.mu, enc.logvar (16, {config.latent_dim})
```

## Plugins

| plugin | source | version |
|---|---|---|
{rows}
"""


# ---------------------------------------------------------------------------------------------
# reading


def load_weights(path: Path, model: nn.Module, prior: nn.Module) -> None:
    """Load an export's weights into ``model`` and ``prior`` (built from its config.toml), after
    checking every file against the manifest's digest."""
    manifest = read_manifest(path)
    for name, digest in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise DataError(f"export '{path}' is missing {name}")
        if _sha256(file) != digest:
            raise DataError(f"export '{path}': {name} does not match its digest in {MANIFEST} "
                            "(changed or damaged); export the run again")
    st = _safetensors()
    extra = read_json(path / EXTRA_STATE, "export state")
    for module, weights, part in ((model, MODEL_WEIGHTS, "model"),
                                  (prior, PRIOR_WEIGHTS, "prior")):
        try:
            state = {**st.load_file(str(path / weights), device="cpu"), **extra.get(part, {})}
            module.load_state_dict(state)
        except (RuntimeError, OSError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise DataError(f"export '{path}': {weights} does not fit the model of its "
                            f"config.toml ({first})") from None


# ---------------------------------------------------------------------------------------------
# the Hugging Face Hub


def push_to_hub(run_path: str | Path, repo_id: str, *, folder: str | Path | None = None,
                private: bool = False, registry: Registry | None = None) -> str:
    """Export ``run_path`` (into ``folder``, default a temporary folder) and upload it to the
    Hub model repository ``repo_id`` (created if missing); return the repository's URL."""
    try:
        import huggingface_hub
    except ImportError:
        raise NcpvaeError("pushing to the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'ncpvae[hub]'") from None
    with tempfile.TemporaryDirectory(prefix="ncpvae-export-") as scratch:
        out = Path(folder) if folder is not None else Path(scratch) / Path(run_path).name
        export_run(run_path, out, overwrite=True, registry=registry)
        try:
            return _upload(huggingface_hub, out, repo_id, private=private)
        except (OSError, ValueError) as exc:  # the hub's errors (offline, no token, no rights,
            # a bad repo id) are OSErrors and ValueErrors: its own words, in one line
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise NcpvaeError(f"cannot push to the Hugging Face Hub repository '{repo_id}' "
                              f"({type(exc).__name__}: {reason}); check the network and "
                              "`huggingface-cli login`") from None


def _upload(hub: Any, folder: Path, repo_id: str, *, private: bool) -> str:
    """Create the model repository ``repo_id`` if needed and upload ``folder`` into it."""
    api = hub.HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="ncpvae export")
    return str(url)

