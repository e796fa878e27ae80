"""Checkpoints that are whole or absent, verified before they are resumed, and read without unpickling code.

A checkpoint is ``<output_dir>/checkpoints/step-N/``: DeepSpeed's files (``*_model_states.pt``,
``*_optim_states.pt``), one ``trainer_state_rank<r>.json`` per rank and, written last, ``manifest.json``:
the size and sha256 of every file in the folder. The manifest is the completion marker: it is written by
rank 0 only after every rank has written and hashed its files (a collective), and ``latest`` moves to the
step only after it. A folder without a manifest is a save that was interrupted.

On resume every rank looks at the same candidates, newest first (rank 0 lists them and broadcasts the
list), checks sizes and sha256 (the hashing split across the ranks), and the ranks agree on the first
step that passed everywhere (an all-reduce). A step that fails is skipped with a warning naming the file;
when steps were complete but none passes, the run stops with an error naming them. The checkpoint folder
must be one filesystem that every rank sees (DeepSpeed's layout: every rank reads rank 0's model states);
a rank that cannot see the files says so.

DeepSpeed's ``.pt`` files are pickles. They are checked for any global outside the few classes DeepSpeed's
checkpoints hold (``torch.serialization.get_unsafe_globals_in_checkpoint``, which executes nothing) and
then loaded with ``torch.load(weights_only=True)`` allowing those classes only, so a tampered file can
never run code, even with a manifest that matches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "Checkpoints",
    "kept_checkpoints",
    "read_trainer_state",
    "sha256_file",
    "unsafe_globals",
    "weights_only_load",
    "write_atomic",
]

log = logging.getLogger("train")

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP = re.compile(r"step-(\d+)")


def _free(path: Path) -> str:
    """How full the filesystem under ``path`` is, for error messages."""
    try:
        usage = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists()))
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed, or a checkpoint folder with no step that can be."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint written in a layout this version cannot resume. Not damage: the run's older steps have
    the same layout, so resuming stops here instead of falling back to them."""


def _deepspeed_globals() -> list[type]:
    """The classes beyond tensors and builtins that DeepSpeed 0.19's checkpoints pickle: the ZeRO 1-3
    optimizer states' loss scaler (static, or dynamic under fp16), stage enum and fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a torch.save file names beyond what weights_only loading allows here (nothing runs)."""
    with torch.serialization.safe_globals(_deepspeed_globals()):
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))


def weights_only_load(path: str | Path, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(_deepspeed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _weights_only_engine(config_params: Any) -> Any:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, reading with weights_only=True (its own load passes False)."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return weights_only_load(path, map_location)

    return WeightsOnlyCheckpointEngine(config_params)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or is unchanged: a temporary file beside it, flushed, then renamed. A failed
    write (ENOSPC) removes its temporary file and raises an OSError naming ``path``."""
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException as exc:
        Path(partial).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def kept_checkpoints(scores: dict[int, float], keep_last: int, best_mode: str | None) -> set[int]:
    """The steps whose checkpoints retention keeps: the newest ``keep_last``, plus the best score (if
    ``best_mode`` is "min" or "max"; ties go to the earlier step)."""
    steps = sorted(scores)
    kept = set(steps[-keep_last:])
    if best_mode and steps:
        sign = 1 if best_mode == "min" else -1
        kept.add(min(steps, key=lambda s: (sign * scores[s], s)))
    return kept


def read_trainer_state(path: Path, checkpoint: Path) -> Any:
    """A rank's TrainerState; an error naming the checkpoint when the file is missing or not valid JSON."""
    from train.engine import TrainerState

    try:
        return TrainerState.from_json(path.read_text())
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(
            f"{path}: {exc}. This version cannot continue that run's data stream: finish the run with the mmdiff "
            f"version that wrote it, or start a new run in another output_dir (or move {checkpoint.parent} away); "
            "a new run starts from step 0") from exc
    except FileNotFoundError as exc:
        raise CheckpointError(f"{checkpoint}: {path.name} is missing (written with another number of ranks?)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint}: {path.name} is not a valid trainer state: {exc}") from exc


class Checkpoints:
    """The checkpoint folder of a run, as one rank sees it. Every method is collective: all ranks call it."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", rank: int | None = None,
                 world: int | None = None):
        """``rank`` and ``world`` default to the process group's (set them to check a folder offline)."""
        self.folder = Path(folder)
        self.device = torch.device(device)  # collectives' tensors live here (NCCL needs the GPU)
        distributed = dist.is_initialized()
        self.rank = rank if rank is not None else dist.get_rank() if distributed else 0
        self.world = world if world is not None else dist.get_world_size() if distributed else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    # -- collectives on plain data (JSON as bytes: nothing from another process is unpickled) ----------
    def _all_true(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def _gather_json(self, data: Any) -> list[Any]:
        if not dist.is_initialized():
            return [data]
        payload = torch.tensor(list(json.dumps(data).encode()), dtype=torch.uint8, device=self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=self.device))
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: payload.numel()] = payload
        parts = [torch.zeros(longest, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return [json.loads(bytes(p[: int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes)]

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # -- save ----------------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, state_json: str, on_saved: Callable[[int], None] | None = None,
             dropped: set[int] = frozenset(), pruned_beside: tuple[Path, ...] = ()) -> None:
        """Write step ``step`` (DeepSpeed's files and this rank's trainer state), hash it, publish it
        (manifest, then ``latest``), call ``on_saved``, then remove the ``dropped`` steps (here and in the
        folders ``pruned_beside``). A failed save leaves no manifest, so the step is never resumed."""
        tag = f"step-{step}"
        target = self.folder / tag
        ok, error = True, ""
        if self.local_rank == 0:  # a folder left by an interrupted save of this step, or one that failed its check
            shutil.rmtree(target, ignore_errors=True)
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                ok, error = False, f"cannot create {target}: {exc}"
        if not self._all_true(ok):
            raise CheckpointError(f"{target}: checkpoint not saved: {error or 'another node could not create it'}")
        try:
            # the frozen base (UNet, VAE, text encoders) is rebuilt from its spec, not stored per checkpoint
            engine.save_checkpoint(str(self.folder), tag=tag, exclude_frozen_parameters=True, save_latest=False)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            ok, error = False, f"rank {self.rank}: DeepSpeed could not write {target} ({_free(target)}): {exc}"
            self._barrier()  # the barrier DeepSpeed's save ends with, which this rank did not reach
        own: dict[str, Any] = {}
        if ok:
            try:
                state_file = target / f"trainer_state_rank{self.rank}.json"
                write_atomic(state_file, state_json.encode())
                own = {state_file.name: self._entry(state_file)}
                for name in self._deepspeed_files(engine, tag):
                    own[name] = self._entry(target / name)
            except OSError as exc:
                ok, error = False, f"rank {self.rank}: {exc} ({_free(target)})"
        reports = self._gather_json({"ok": ok, "error": error, "files": own})
        failures = [r["error"] for r in reports if not r["ok"]]
        if failures:
            self._discard(target)
            raise CheckpointError(f"{target}: checkpoint not saved: " + "; ".join(failures))
        if self.rank == 0:
            files = {name: entry for report in reports for name, entry in report["files"].items()}
            for path in sorted(p for p in target.rglob("*") if p.is_file()):  # anything else DeepSpeed wrote
                files.setdefault(path.relative_to(target).as_posix(), self._entry(path))
            try:
                manifest = {"format": 1, "step": step, "world_size": self.world, "files": dict(sorted(files.items()))}
                write_atomic(target / MANIFEST, json.dumps(manifest, indent=1).encode())
                write_atomic(self.folder / LATEST, tag.encode())
            except OSError as exc:
                ok, error = False, f"{exc} ({_free(target)})"
        if not self._all_true(ok):
            self._discard(target)
            raise CheckpointError(f"{target}: checkpoint not published: {error or 'rank 0 could not write its manifest'}")
        log.info("rank %d: checkpoint %s saved and verified by manifest", self.rank, target)
        if on_saved:
            on_saved(step)
        if dropped and self.local_rank == 0:  # one deleter per node (and per filesystem)
            for old in sorted(dropped):
                for folder in (self.folder, *pruned_beside):
                    shutil.rmtree(folder / f"step-{old}", ignore_errors=True)
            log.info("retention: removed checkpoints %s", sorted(dropped))
        self._barrier()  # nobody reads the checkpoint folder while it is being pruned

    def _discard(self, target: Path) -> None:
        """Remove a step that was not published: its partial files would only fill the disk further."""
        if self.local_rank == 0:
            shutil.rmtree(target, ignore_errors=True)
        self._barrier()

    @staticmethod
    def _entry(path: Path) -> dict[str, Any]:
        return {"size": path.stat().st_size, "sha256": sha256_file(path)}

    @staticmethod
    def _deepspeed_files(engine: Any, tag: str) -> list[str]:
        """The files this rank's DeepSpeed engine wrote for ``tag`` (the names DeepSpeed gives them)."""
        names = []
        if engine.save_non_zero_checkpoint:
            names.append(Path(engine._get_ckpt_name("", tag)).name)
        if engine.save_zero_checkpoint and engine.zero_optimization():
            names.append(Path(engine._get_zero_ckpt_name("", tag)).name)
        return names

    # -- resume --------------------------------------------------------------------------------------
    def candidates(self) -> list[str]:
        """Step folders, newest first, as rank 0 sees them (the same list on every rank)."""
        mine = []
        if self.rank == 0 and self.folder.is_dir():
            steps = [(int(m.group(1)), p.name) for p in self.folder.iterdir()
                     if p.is_dir() and (m := _STEP.fullmatch(p.name))]
            mine = [name for _, name in sorted(steps, reverse=True)]
        return self._gather_json(mine)[0]

    def check(self, tag: str) -> tuple[list[str], Any, bool]:
        """This rank's share of the checks of ``tag``: (problems, this rank's TrainerState or None, whether
        the save was interrupted: no manifest).
        Sizes are checked everywhere, sha256 and pickled globals of every world-th file here."""
        target = self.folder / tag
        try:
            manifest = json.loads((target / MANIFEST).read_text())
            files, world = manifest["files"], manifest["world_size"]
        except FileNotFoundError:
            return [f"{target} is incomplete (no {MANIFEST}: its save was interrupted)"], None, True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return [f"{target / MANIFEST}: unreadable manifest: {exc}"], None, False
        if world != self.world:
            return [f"{target}: written by {world} ranks, this run has {self.world}"], None, False
        if f"trainer_state_rank{self.rank}.json" not in files:
            return [f"{target / MANIFEST}: lists no trainer_state_rank{self.rank}.json"], None, False
        problems = []
        for i, name in enumerate(sorted(files)):
            try:
                problems += self._check_file(target, name, files[name], mine=i % self.world == self.rank
                                             or name == f"trainer_state_rank{self.rank}.json")
            except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
                problems.append(f"{target / name}: cannot be checked: {exc}")
        state = None
        if not problems:
            try:
                state = read_trainer_state(target / f"trainer_state_rank{self.rank}.json", target)
            except CheckpointFormatError:
                raise  # every rank reads the same layout here: all stop, none waits in a collective
            except CheckpointError as exc:
                problems.append(str(exc))
        return problems, state, False

    def _check_file(self, target: Path, name: str, entry: dict[str, Any], mine: bool) -> list[str]:
        """Size always; sha256 and pickled globals when the file is in this rank's share (``mine``)."""
        path = target / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return [f"{target / MANIFEST}: names a file outside the checkpoint: {name}"]
        if not path.is_file():
            return [f"{path}: missing on rank {self.rank} (the checkpoint folder must be shared by all ranks)"]
        if path.stat().st_size != entry["size"]:
            return [f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']}"]
        if mine and sha256_file(path) != entry["sha256"]:
            return [f"{path}: sha256 differs from the manifest (corrupt or modified)"]
        if mine and path.suffix == ".pt" and (names := unsafe_globals(path)):
            return [f"{path}: pickles globals no checkpoint holds: {names} (refused, not loaded)"]
        return []

    def resume(self, engine: Any) -> Any:
        """Load the newest step that every rank verified into ``engine``; its TrainerState for this rank,
        or None when there is none (only interrupted saves, or a fresh run)."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        candidates = self.candidates()
        if candidates and type(engine.checkpoint_engine) is not TorchCheckpointEngine:
            raise CheckpointError(f"DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__} is not "
                                  "supported: checkpoints are read with torch.load(weights_only=True)")
        if candidates:
            engine.checkpoint_engine = _weights_only_engine(engine._config)
        failed = []
        for tag in candidates:
            problems, state, interrupted = self.check(tag)
            complete = self._all_true(not problems)
            for problem in problems:
                log.warning("rank %d: skipping checkpoint %s: %s", self.rank, tag, problem)
            if complete:
                path, _ = engine.load_checkpoint(str(self.folder), tag=tag, load_module_strict=False)
                if not self._all_true(path is not None):
                    raise CheckpointError(f"{self.folder / tag}: DeepSpeed could not load the checkpoint")
                if failed:
                    log.warning("rank %d: resumed from %s, the newest complete checkpoint that verified "
                                "(skipped %s)", self.rank, tag, ", ".join(failed))
                return state
            if not self._all_true(not interrupted):
                continue  # an interrupted save: not a failure, the previous step is the newest complete one
            failed.append(tag)
        if failed:
            raise CheckpointError(f"{self.folder}: no checkpoint verified; {', '.join(failed)} failed their checks "
                                  "(see the warnings above). Move them away to start this run from scratch.")
        return None
