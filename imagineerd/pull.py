"""``imagineerd pull``: a model from the Hugging Face hub into ``paths.models``.

``OWNER/REPO`` is a diffusers pipeline. Hub repos hold far more than a pipeline needs (the
stable-diffusion-v1-5 repo has fp32 and fp16 weights, ``.bin`` pickles, Flax and ONNX
copies and two multi-GB single-file checkpoints beside the diffusers folders), so only
model_index.json and, for each component it names, the configs and *one* set of weights are
downloaded: safetensors before ``.bin``, the default (unsuffixed) files before a variant such
as ``fp16``. A variant taken because a component has nothing else is renamed to the default
names, because the backend loads the folder with a plain ``from_pretrained`` (no
``variant=``). The NSFW safety checker is left out (the backend never runs it, like A1111
and ComfyUI) and model_index.json says so, so the folder still loads anywhere.

``OWNER/REPO/PATH.safetensors`` is one single-file checkpoint (or with ``into``, a LoRA,
embedding or VAE).

Everything is downloaded into a hidden folder inside the target folder (the models scan
skips names starting with ``.``) and renamed into place only when complete, so the listing
never shows half a model; an existing model is never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm
from huggingface_hub.utils import validate_repo_id

from .errors import Conflict, Forbidden, ImagineerdError, NotFound, ValidationError
from .fsutil import fsync_dir
from .model_scan import CHECKPOINT_SUFFIXES, OTHER_SUFFIXES, detect_layout, scan

if TYPE_CHECKING:
    from .config import Config

#: The folders ``into`` may name (categories of the models listing).
CATEGORIES = ("checkpoints", "loras", "embeddings", "vaes")

#: Components the backend never loads: the NSFW filter (1.2 GB in fp32 for SD1.5).
SKIPPED_COMPONENTS = ("safety_checker",)

#: Weight file stems of diffusers models (``diffusion_pytorch_model``) and transformers
#: models (``model`` for safetensors, ``pytorch_model`` for pickles). Other weights in a
#: component folder (``openvino_model.bin``, ``flax_model.msgpack``) are not loaded by
#: diffusers' PyTorch pipelines.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")

# diffusers' and transformers' names: STEM[.VARIANT][-00001-of-00002].EXT for weights and
# STEM.EXT.index[.VARIANT].json for the index of a sharded set.
_WEIGHT = re.compile(
    r"(?P<stem>[^.]+?)(?:\.(?P<variant>\w+))?(?P<shard>-\d{5}-of-\d{5})?\.(?P<ext>safetensors|bin)"
)
_INDEX = re.compile(
    r"(?P<stem>[^.]+)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json"
)

#: Small files of a component folder that a pipeline reads: configs, tokenizer vocabularies
#: and merges, sentencepiece models.
CONFIG_SUFFIXES = (".json", ".txt", ".model")

#: Preference among weight sets: safetensors never run code when loaded, pickles do; the
#: default names load without ``variant=``; fp16 is the usual alternative, non_ema is for
#: training.
_EXT_RANK = {"safetensors": 0, "bin": 1}
_VARIANT_RANK = {None: 0, "fp16": 1, "bf16": 2, "non_ema": 9}

#: Seconds to wait for the hub's answer to the first request (a firewall that drops packets
#: would otherwise hang the command).
TIMEOUT = 30.0


class PullError(ImagineerdError):
    """The hub could not be reached, refused the download, or the disk filled up."""

    status = 502
    code = "pull_failed"


class _QuietBar(hf_tqdm):
    """No bar for model_index.json: a few hundred bytes, fetched before the plan (and the
    line that announces the download) exists."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


@dataclass
class Plan:
    """What to download of a pipeline repo and what to do with it afterwards."""

    downloads: list[str] = field(default_factory=list)  # repo paths
    renames: dict[str, str] = field(default_factory=dict)  # repo path -> local path
    skipped: list[str] = field(default_factory=list)  # components left out
    pickles: list[str] = field(default_factory=list)  # .bin weights taken (no safetensors)


@dataclass
class Pulled:
    """A finished pull: where it was written and how the models listing names it."""

    path: Path
    category: str
    files: int
    size: int
    name: str | None  # as GET /api/models lists it; None if the listing does not show it
    format: str | None
    arch: str | None


def parse_source(source: str) -> tuple[str, str | None]:
    """``(repo id, path of one file in it or None)`` from ``OWNER/REPO[/PATH]``."""
    usage = (
        "give OWNER/REPO for a diffusers pipeline or OWNER/REPO/FILE.safetensors for one file, "
        "as in https://huggingface.co/OWNER/REPO"
    )
    if "://" in source:
        raise ValidationError(f"{source!r} is a URL; {usage}", field="source")
    parts = source.rstrip("/").split("/")
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts) or "\\" in source:
        raise ValidationError(f"{source!r} is not a hub repo id; {usage}", field="source")
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).split(":")[0].rstrip(".")
        raise ValidationError(
            f"{repo_id!r} is not a hub repo id ({reason}); {usage}", field="source"
        ) from None
    return repo_id, "/".join(parts[2:]) or None


def _suffixes(category: str) -> dict[str, str]:
    return CHECKPOINT_SUFFIXES if category == "checkpoints" else OTHER_SUFFIXES


def plan_pipeline(repo_id: str, files: Iterable[str], index: dict) -> Plan:
    """The files of a pipeline repo to download, given its file list and model_index.json.

    Raises ``PullError`` when a component model_index.json names has no folder or no weights
    diffusers can load, before gigabytes are downloaded for a pipeline that cannot load.
    """
    files = sorted(set(files))
    plan = Plan(downloads=["model_index.json"])
    for component, value in index.items():
        if component.startswith("_") or not isinstance(value, list | tuple) or len(value) != 2:
            continue  # _class_name, requires_safety_checker, ...
        if value[0] is None or value[1] is None:  # a component the pipeline goes without
            continue
        if component in SKIPPED_COMPONENTS:
            plan.skipped.append(component)
            continue
        prefix = f"{component}/"
        inside = [f[len(prefix) :] for f in files if f.startswith(prefix)]
        inside = [name for name in inside if "/" not in name]
        if not inside:
            raise PullError(
                f"{repo_id}: model_index.json names the component {component!r} but the repo "
                f"has no {component}/ folder, so the pipeline cannot load"
            )
        sets: dict[tuple[str, str | None], list[str]] = {}
        configs: list[str] = []
        for name in inside:
            match = _WEIGHT.fullmatch(name) or _INDEX.fullmatch(name)
            if match and match["stem"] in WEIGHT_STEMS:
                sets.setdefault((match["ext"], match["variant"]), []).append(name)
            elif name.endswith(CONFIG_SUFFIXES) and ".index." not in name:
                configs.append(name)  # an index of weights we do not take is left out too
        chosen: list[str] = []
        if sets:
            ext, variant = min(
                sets, key=lambda key: (_EXT_RANK[key[0]], _VARIANT_RANK.get(key[1], 5), key[1])
            )
            chosen = sets[ext, variant]
            if ext == "bin":
                plan.pickles.append(component)
            if variant is not None:
                for name in chosen:
                    plan.renames[prefix + name] = prefix + default_name(name)
        elif "config.json" in configs:  # a model (not a tokenizer, scheduler) without weights
            raise PullError(
                f"{repo_id}: {component}/ has no weights diffusers can load (.safetensors or "
                f".bin), only {', '.join(inside)}"
            )
        plan.downloads += [prefix + name for name in configs + chosen]
    return plan


def default_name(name: str) -> str:
    """A variant's file name without the variant: what ``from_pretrained`` looks for."""
    if match := _INDEX.fullmatch(name):
        return f"{match['stem']}.{match['ext']}.index.json"
    if match := _WEIGHT.fullmatch(name):
        return f"{match['stem']}{match['shard'] or ''}.{match['ext']}"
    return name


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes: huggingface_hub wraps the real reason (a refused
    connection, a 403) in a LocalEntryNotFoundError."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _explain(
    exc: BaseException,
    repo_id: str,
    revision: str | None,
    path: str | None,
    folder: Path,
    need: int,
    reached: bool,
) -> ImagineerdError:
    """One clear line for whatever the hub, the network or the disk raised; ``reached``:
    whether the hub had already answered."""
    chain = _chain(exc)
    page = f"{constants.ENDPOINT}/{repo_id}"
    login = (
        "run `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"
    )
    for error in chain:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            needs = f" (the download needs about {_size(need)})" if need else ""
            return PullError(
                f"no space left in {folder} while downloading {repo_id}{needs}; free some space "
                "and run the pull again (nothing was kept)"
            )
    for error in chain:
        if isinstance(error, GatedRepoError):
            return Forbidden(
                f"{repo_id} is gated: accept its conditions at {page} with your Hugging Face "
                f"account, then {login}"
            )
        if isinstance(error, RepositoryNotFoundError):
            return NotFound(
                f"there is no model repo {repo_id} on {constants.ENDPOINT} (check the name at "
                f"{page}; a private repo looks the same without a token: {login})"
            )
        if isinstance(error, RevisionNotFoundError):
            return NotFound(f"{repo_id} has no revision {revision!r} (a branch, tag or commit)")
        if isinstance(error, RemoteEntryNotFoundError):
            return NotFound(f"{repo_id} has no file {path!r} (see {page}/tree/main)")
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            status = error.response.status_code
            if status in (401, 403):
                return Forbidden(f"the hub refused access to {repo_id} (HTTP {status}): {login}")
            later = "; try again later" if status >= 500 or status == 429 else ""
            return PullError(f"the hub answered HTTP {status} for {repo_id}{later} ({page})")
        if isinstance(error, OfflineModeIsEnabled):
            return PullError(
                "HF_HUB_OFFLINE is set in the environment, so huggingface_hub does not go "
                "online; unset it to pull"
            )
    what = "its folder" if path is None else "the file"
    reason = next(
        (_first_line(e) for e in chain if isinstance(e, httpx2.TransportError)),
        _first_line(chain[-1]),
    )
    if any(isinstance(e, httpx2.TransportError | LocalEntryNotFoundError) for e in chain):
        if reached:  # the hub answered before: the connection broke off in the download
            return PullError(
                f"the connection to the Hugging Face hub at {constants.ENDPOINT} broke off "
                f"while downloading {repo_id} ({reason}); run the pull again (nothing was kept)"
            )
        return PullError(
            f"this machine cannot reach the Hugging Face hub at {constants.ENDPOINT} ({reason}); "
            f"download {repo_id} on a machine with internet (`imagineerd pull` there, or from "
            f"{page}) and copy {what} into {folder}"
        )
    return PullError(f"pulling {repo_id} failed: {_first_line(exc)}")


@contextlib.contextmanager
def _hub_errors(
    repo_id: str,
    revision: str | None,
    path: str | None,
    folder: Path,
    need: int = 0,
    reached: bool = True,
) -> Iterator[None]:
    """Turn what huggingface_hub, httpx and the disk raise into one ImagineerdError."""
    try:
        yield
    except ImagineerdError:
        raise
    except KeyboardInterrupt:
        raise PullError("interrupted; the partial download was removed") from None
    except Exception as exc:
        raise _explain(exc, repo_id, revision, path, folder, need, reached) from exc


def _refuse_existing(target: Path, source: str) -> None:
    if os.path.lexists(target):
        raise Conflict(
            f"{target} already exists; delete or rename it to pull {source} again "
            "(imagineerd never replaces a model)"
        )


def _check_space(folder: Path, need: int, repo_id: str) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise PullError(
            f"not enough space in {folder}: {repo_id} needs {_size(need)}, {_size(free)} free; "
            "free some space or set paths.models to a bigger disk"
        )


def _fsync_tree(path: Path) -> None:
    """fsync every file, so the model the rename publishes survives a power cut whole
    (huggingface_hub does not sync what it writes)."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for item in paths:
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def _publish(source: Path, target: Path, what: str) -> None:
    """Rename the finished download to its listed name; never over an existing model."""
    _fsync_tree(source)
    _refuse_existing(target, what)  # again: another pull may have finished meanwhile
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            _refuse_existing(target, what)
        raise
    fsync_dir(target.parent)


def _finish_pipeline(tmp: Path, plan: Plan) -> None:
    """Variant files under the default names, the skipped components out of
    model_index.json, huggingface_hub's download metadata removed."""
    for repo_path, local in plan.renames.items():
        os.rename(tmp / repo_path, tmp / local)
        if _INDEX.fullmatch(posixpath.basename(local)):
            # A sharded variant's index names its shards: point it at their new names.
            index = json.loads((tmp / local).read_text(encoding="utf-8"))
            weight_map = index.get("weight_map") or {}
            index["weight_map"] = {k: default_name(v) for k, v in weight_map.items()}
            (tmp / local).write_text(json.dumps(index, indent=2), encoding="utf-8")
    if plan.skipped:
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        for component in plan.skipped:
            index[component] = [None, None]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n", "utf-8")
    shutil.rmtree(tmp / ".cache", ignore_errors=True)


def _read_index(path: str, repo_id: str) -> dict:
    try:
        index = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PullError(f"{repo_id}: model_index.json cannot be read: {exc}") from None
    if not isinstance(index, dict):
        raise PullError(f"{repo_id}: model_index.json is not a JSON object")
    return index


def pull(
    source: str,
    config: Config,
    *,
    revision: str | None = None,
    into: str | None = None,
    out: TextIO | None = None,
) -> Pulled:
    """Download ``source`` (``OWNER/REPO`` or ``OWNER/REPO/PATH``) into ``paths.models`` and
    print what was written and its listed name to ``out`` (default stdout). Progress bars
    are huggingface_hub's own, on stderr (``HF_HUB_DISABLE_PROGRESS_BARS`` turns them off).
    Raises an ImagineerdError subclass with one clear line for each failure; nothing is left
    in the listing after one."""
    # httpx logs every request at INFO: dozens of lines that would bury the progress bars.
    for noisy in ("httpx2", "httpx", "httpcore"):
        logger = logging.getLogger(noisy)
        logger.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    with warnings.catch_warnings():
        # huggingface_hub warns file by file when the disk looks too small; the whole
        # download is checked up front here and a full disk is one error line, so its
        # warnings would only repeat that.
        warnings.filterwarnings("ignore", message="Not enough free disk space")
        return _pull(source, config, revision, into, out or sys.stdout)


def _pull(
    source: str, config: Config, revision: str | None, into: str | None, out: TextIO
) -> Pulled:
    repo_id, path = parse_source(source)
    category = into or "checkpoints"
    if category not in CATEGORIES:
        raise ValidationError(f"--into must be one of {', '.join(CATEGORIES)}", field="into")
    if path is None and category != "checkpoints":
        raise ValidationError(
            f"--into {category} is for one file (OWNER/REPO/FILE.safetensors); a diffusers "
            "pipeline always goes into the checkpoints folder",
            field="into",
        )
    if path is not None:
        suffix = posixpath.splitext(path)[1].lower()
        if suffix not in _suffixes(category) or posixpath.basename(path).startswith("."):
            raise ValidationError(
                f"{path!r} is not a file the models listing shows in {category} "
                f"({', '.join(_suffixes(category))}); to pull a whole diffusers pipeline, "
                f"give just {repo_id}",
                field="source",
            )
    root = config.path_for("models")
    folder = detect_layout(root)[1][category]
    name = repo_id.split("/")[1] if path is None else posixpath.basename(path)
    target = folder / name
    _refuse_existing(target, source)  # before any network: a clear answer at once

    with _hub_errors(repo_id, revision, path, folder, reached=False):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=TIMEOUT)
    if not info.sha:
        raise PullError(f"the hub gave no commit for {repo_id}; try again later")
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    where = f"{repo_id} ({f'revision {revision}, ' if revision else ''}commit {info.sha[:12]})"

    if path is None and "model_index.json" not in sizes:
        singles = [f for f in sizes if "/" not in f and f.endswith(".safetensors")][:5]
        hint = (
            f"; its single-file checkpoints: {', '.join(singles)} (pull one with "
            f"`imagineerd pull {repo_id}/{singles[0]}`)"
            if singles
            else ""
        )
        raise NotFound(f"{repo_id} has no model_index.json, so it is no diffusers pipeline{hint}")
    if path is not None and sizes and path not in sizes:
        # Top-level files first: a pipeline's component weights are rarely what was meant.
        candidates = sorted(
            (f for f in sizes if f.lower().endswith(tuple(_suffixes(category)))),
            key=lambda f: (f.count("/"), f),
        )[:5]
        hint = f"; it has {', '.join(candidates)}" if candidates else ""
        raise NotFound(f"{repo_id} has no file {path!r}{hint}")

    with _hub_errors(repo_id, revision, path, folder):  # a read-only or full disk: one line
        folder.mkdir(parents=True, exist_ok=True)
        # Hidden (the scan skips dot names) and in the target folder (the rename is atomic).
        tmp = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=folder))
    try:
        if path is None:
            with _hub_errors(repo_id, revision, path, folder):
                index_file = hf_hub_download(
                    repo_id,
                    "model_index.json",
                    revision=info.sha,
                    local_dir=tmp,
                    tqdm_class=_QuietBar,
                )
            plan = plan_pipeline(repo_id, sizes, _read_index(index_file, repo_id))
            need = sum(sizes.get(f, 0) for f in plan.downloads)
            _check_space(folder, need, repo_id)
            print(
                f"pulling {where}: {len(plan.downloads)} files, {_size(need)}, into {target}",
                file=out,
                flush=True,
            )
            with _hub_errors(repo_id, revision, path, folder, need):
                snapshot_download(
                    repo_id,
                    revision=info.sha,  # the commit listed above, even if main moves meanwhile
                    local_dir=tmp,
                    allow_patterns=[glob.escape(f) for f in plan.downloads],
                )
            missing = [f for f in plan.downloads if not (tmp / f).is_file()]
            if missing:
                raise PullError(f"{repo_id}: the hub sent no {', '.join(missing[:3])}")
            with _hub_errors(repo_id, revision, path, folder, need):
                _finish_pipeline(tmp, plan)
                _publish(tmp, target, source)
            files = len(plan.downloads)
            for component in plan.skipped:
                print(f"left out {component} (imagineerd never runs it)", file=out)
            for component in plan.pickles:
                print(f"note: {component} has only .bin (pickle) weights; took those", file=out)
        else:
            need = sizes.get(path, 0)
            _check_space(folder, need, repo_id)
            print(f"pulling {path} from {where}, {_size(need)}, into {target}", file=out)
            out.flush()  # before huggingface_hub's progress bar on stderr
            with _hub_errors(repo_id, revision, path, folder, need):
                local = hf_hub_download(repo_id, path, revision=info.sha, local_dir=tmp)
                _publish(Path(local), target, source)
            files = 1
            if not name.lower().endswith(".safetensors"):
                print(f"note: {name} is a pickle: loading it can run code in it", file=out)
    finally:
        # On success only huggingface_hub's metadata is left in there; on failure the partial
        # download, never listed (hidden) and removed now.
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(target, category, files, root, out)


def _report(target: Path, category: str, files: int, root: Path, out: TextIO) -> Pulled:
    """Print what was written and the name the listing (and model.name) knows it by."""
    entry = None
    with contextlib.suppress(Exception):  # the files are in place; the listing is a courtesy
        real = os.path.realpath(target)
        entry = next((m for m in scan(root)[1][category] if os.path.realpath(m.path) == real), None)
    if target.is_dir():
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    else:
        size = target.stat().st_size
    pulled = Pulled(
        target,
        category,
        files,
        size,
        entry.name if entry else None,
        entry.format if entry else None,
        entry.arch if entry else None,
    )
    count = "1 file" if files == 1 else f"{files} files"
    print(f"wrote {target} ({count}, {_size(size)})", file=out)
    if entry is None:
        print(f"GET /api/models does not list it (paths.models is {root})", file=out)
        return pulled
    print(
        f"GET /api/models lists it in {category} as {entry.name!r} ({entry.format}, "
        f"arch {entry.arch})",
        file=out,
    )
    if category == "checkpoints":
        print(
            f"to make it the default, set  model.name: {entry.name}  in config.yaml",
            file=out,
        )
    return pulled
