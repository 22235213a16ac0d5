"""The training loop shared by every stage: accelerate, resumable checkpoints, progress, JSON-lines log.

Reproducibility across a kill: the batch of step `s` and all randomness of that step (noise, timesteps,
dropouts) are functions of (seed, s, rank) only, and the checkpoint restores weights, optimiser and LR
scheduler, so a run stopped after k steps and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import fnmatch
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from spatiallock.checkpoint import (
    UnreadableCheckpoint,
    list_checkpoints,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from spatiallock.errors import SpatialLockError
from spatiallock.files import write_text_atomic


class NonFiniteLoss(SpatialLockError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resume(
    checkpoints: Path, models: dict[str, nn.Module], optimizer, lr_scheduler, main: bool
) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """Restore the newest readable checkpoint in `checkpoints`: (its step, its tensor files); (0, {}) if there is
    none. A newer one that cannot be read is named in a warning (main process) and the one before it used; when
    none can be read, `SpatialLockError`."""
    found = list_checkpoints(checkpoints)
    unreadable = []
    for path in reversed(found):
        try:
            state, files = load_checkpoint(path, models, optimizer, lr_scheduler)
        except UnreadableCheckpoint as err:
            unreadable.append(str(err))
            continue
        if main:
            for reason in unreadable:
                print(f"spatiallock: warning: {reason}; resuming from {path.name} instead", file=sys.stderr)
        # the learning rates of the schedule as it is now at the step resumed from (the optimizer's state holds
        # those of the schedule it was saved under: another one where a drop was added at that step)
        for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
            group["lr"] = base * factor(lr_scheduler.last_epoch)
        return state["step"], files
    if unreadable:
        more = f" (and {len(unreadable) - 1} older ones)" if len(unreadable) > 1 else ""
        raise SpatialLockError(f"--resume: {unreadable[0]}{more}; no checkpoint to resume from")
    return 0, {}


@dataclass
class LoopConfig:
    """How long and how a stage trains. `batch_size` is per process."""

    max_steps: int
    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights and return it at the end
    num_workers: int = 0
    resume: bool = False
    progress: bool = True
    # parameters whose names ("<model>.<parameter>") end with one of these suffixes, or match one of these
    # patterns (with * or ?), learn at `learning_rate * factor`; the first that applies counts
    lr_scales: tuple[tuple[str, float], ...] = ()
    # the parameters of these models (by their names in `train_loop`'s `models`) learn at `learning_rate * factor`
    model_lr_scales: tuple[tuple[str, float], ...] = ()
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's; GANs use (0, 0.999)
    lr_milestones: tuple[int, ...] = ()  # from each of these steps on, the learning rate is another 0.1x


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """The `Accelerator` of one training run: the GPU when there is one, `mixed_precision` autocast.

    accelerate keeps its precision state per process; it is reset (the process group is kept) so that one
    Python process can run several trainings with different precisions one after another.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random generator of one step on one process."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 101 + rank)


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: the batch of global step `s` on process `rank`, from step `start` on, without end.

    The global stream is a new seeded permutation of the data set every epoch; each process takes its slice
    of every global batch. Items are (epoch, index) pairs so that augmentation can depend on the epoch.
    """

    def __init__(self, size: int, batch_size: int, world_size: int, rank: int, seed: int, start: int = 0):
        if size == 0:
            raise SpatialLockError("data: the training set is empty after filtering")
        self.size, self.batch_size, self.world, self.rank, self.seed, self.start = (
            size,
            batch_size,
            world_size,
            rank,
            seed,
            start,
        )
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return self._perm[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = (step * self.world + self.rank) * self.batch_size
        items = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.size)
            items.append((epoch, int(self._permutation(epoch)[offset])))
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


class EpochIndexed(torch.utils.data.Dataset):
    """Wraps a data set with `set_epoch` so that items are fetched by (epoch, index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class JsonLog:
    """Append-only JSON-lines log; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, stage: str, resume_step: int, enabled: bool = True):
        self.path, self.stage, self.enabled = path, stage, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # a line cut by a kill
                if not isinstance(entry, dict):
                    continue
                step = entry.get("step", 0)
                if entry.get("stage") != stage or not isinstance(step, (int, float)) or step <= resume_step:
                    kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))  # a kill here keeps the old log

    def write(self, entry: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"stage": self.stage, **entry}) + "\n")


class _StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a flag checked between steps; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def name_matches(name: str, key: str) -> bool:
    """Whether parameter `name` is one `key` of `LoopConfig.lr_scales` names: a pattern with * or ?, else a
    suffix."""
    return fnmatch.fnmatchcase(name, key) if any(c in key for c in "*?[") else name.endswith(key)


def param_groups(named: list[tuple[str, nn.Parameter]], config: LoopConfig) -> list[dict]:
    """One optimiser group at the base learning rate, one per factor of `lr_scales` (by parameter name suffix)
    and `model_lr_scales` (by model: names are "<model>.<parameter>") that applies to any parameter."""
    groups = {1.0: []}
    for name, param in named:
        factor = next((f for key, f in config.lr_scales if name_matches(name, key)), 1.0)
        factor *= next((f for model, f in config.model_lr_scales if name.startswith(f"{model}.")), 1.0)
        groups.setdefault(factor, []).append(param)
    return [{"params": ps, "lr": config.learning_rate * f} for f, ps in groups.items() if ps]


def constant_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, milestones: tuple[int, ...] = ()
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base learning rate, then constant; 0.1x more from each step of `milestones` on."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * 0.1 ** sum(step >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _ema_shadow(shadow: dict[str, torch.Tensor], model: nn.Module, checkpoints: Path) -> list[torch.Tensor]:
    """The saved moving average of `model`'s parameters, checked against them."""
    params = list(model.parameters())
    values = [shadow.get(str(i)) for i in range(len(params))]
    if "optimization_step" not in shadow or any(v is None or v.shape != p.shape for v, p in zip(values, params)):
        raise SpatialLockError(f"{checkpoints}: the saved weight average does not fit the model being trained")
    return values


@dataclass
class LoopResult:
    """Where a run ended. `models`: the trained models as given (unwrapped), on every process."""

    step: int
    interrupted: bool
    last_losses: dict[str, float]
    models: dict[str, nn.Module] = field(default_factory=dict)


def train_loop(
    *,
    accelerator: Accelerator,
    stage: str,
    folder: Path,
    models: dict[str, nn.Module],
    dataset,
    collate_fn: Callable,
    compute_losses: Callable[[dict, dict, torch.Generator], dict[str, torch.Tensor]] | None = None,
    config: LoopConfig,
    log_extra: Callable[[], dict] | None = None,
    update: Callable | None = None,
) -> LoopResult:
    """Train `models` (all of them trainable) for `config.max_steps` steps of `compute_losses`.

    `compute_losses(models, batch, generator)` gets the prepared (possibly DDP-wrapped) models and returns a
    dict with the total under "loss" and its parts. A stage whose players take turns (a GAN) gives `update`
    instead: `update(models, batch, generator, step, optimizer, backward)` makes the step's updates itself (each
    `backward(loss)` then `optimizer.step()`, the gradients cleared between) and returns the same dict.
    Checkpoints go to `folder/checkpoints/<stage>/`, the log to `folder/log.jsonl`.
    """
    checkpoints = folder / "checkpoints" / stage
    named = [(f"{k}.{n}", p) for k, m in models.items() for n, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = param_groups(named, config)
    optimizer = torch.optim.AdamW(
        groups, lr=config.learning_rate, weight_decay=config.weight_decay, betas=tuple(map(float, config.betas))
    )
    lr_scheduler = constant_with_warmup(optimizer, config.warmup_steps, tuple(config.lr_milestones))
    start, files = (
        resume(checkpoints, models, optimizer, lr_scheduler, accelerator.is_main_process) if config.resume else (0, {})
    )
    ema = {}
    if config.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        for name, model in models.items():
            ema[name] = EMAModel(model.parameters(), decay=config.ema_decay)
            shadow = files.get(f"ema_{name}")
            if shadow is not None:  # else: start the average from the resumed weights
                ema[name].shadow_params = _ema_shadow(shadow, model, checkpoints)
                ema[name].optimization_step = int(shadow["optimization_step"])
    names = list(models)
    prepared = accelerator.prepare(*models.values(), optimizer)
    wrapped = dict(zip(names, prepared[: len(names)]))
    optimizer = prepared[-1]

    main = accelerator.is_main_process
    if main:
        remove_temporaries(checkpoints)  # left by a kill during a checkpoint write
    log = JsonLog(folder / "log.jsonl", stage, start, enabled=main)
    sampler = StepBatches(
        len(dataset), config.batch_size, accelerator.num_processes, accelerator.process_index, config.seed, start
    )
    # The loader draws its workers' base seed when iterated: from its own generator, not the global RNG, so that
    # the global RNG a checkpoint restored is the one the uninterrupted run had at that step.
    loader = torch.utils.data.DataLoader(
        EpochIndexed(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip

    def ema_tensors() -> dict[str, dict[str, torch.Tensor]]:
        files = {}
        for name, average in ema.items():
            files[f"ema_{name}"] = {str(i): p for i, p in enumerate(average.shadow_params)}
            files[f"ema_{name}"]["optimization_step"] = torch.tensor(average.optimization_step)
        return files

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            unwrapped = {name: accelerator.unwrap_model(m) for name, m in wrapped.items()}
            save_checkpoint(
                checkpoints, step, unwrapped, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                lr_scheduler, {"stage": stage}, config.keep_checkpoints, tensors=ema_tensors(),
            )  # fmt: skip
        accelerator.wait_for_everyone()

    step, last, saved_at = start, {}, start
    bar = tqdm(
        total=config.max_steps, initial=start, desc=stage, disable=not (main and config.progress), smoothing=0.1
    )
    batches = iter(loader)
    tic = time.perf_counter()
    for model in wrapped.values():
        model.train()
    with _StopRequest() as stop:
        try:
            while step < config.max_steps and not stop.requested:
                batch = next(batches)
                generator = step_generator(config.seed, step, accelerator.process_index, accelerator.device)
                if update is not None:
                    with accelerator.autocast():
                        losses = update(wrapped, batch, generator, step, optimizer, accelerator.backward)
                else:
                    with accelerator.autocast():
                        losses = compute_losses(wrapped, batch, generator)
                loss = losses["loss"]
                if not torch.isfinite(loss.detach()).all():
                    kept = list_checkpoints(checkpoints)
                    where = f"{kept[-1]} is kept" if kept else "no checkpoint had been written yet"
                    raise NonFiniteLoss(f"loss: became {loss.item()} at step {step + 1}; stopped, {where}")
                if update is None:
                    accelerator.backward(loss)
                    if config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for name, average in ema.items():
                    average.step(models[name].parameters())
                step += 1
                last = {k: float(v.detach()) for k, v in losses.items()}
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
                if step % config.log_every == 0 or step == config.max_steps:
                    elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                    entry = {"step": step, **last, "lr": lr_scheduler.get_last_lr()[0]}
                    entry["steps_per_s"] = round(config.log_every / elapsed, 4) if elapsed > 0 else None
                    if log_extra is not None:
                        entry.update(log_extra())
                    log.write(entry)
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    save(step)
                    saved_at = step
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last periodic checkpoint
            bar.close()
            raise
        interrupted = stop.requested
    bar.close()
    if interrupted and step != saved_at:
        save(step)
    if not interrupted:  # finished: the models hold their averaged weights (checkpoints keep the raw ones)
        for name, average in ema.items():
            average.copy_to(models[name].parameters())
    if interrupted and main:
        print(f"{stage}: stopped at step {step}; checkpoint written. Run again with --resume to continue.")
    unwrapped = {name: accelerator.unwrap_model(m) for name, m in wrapped.items()}
    return LoopResult(step, interrupted, {k: v for k, v in last.items() if math.isfinite(v)}, unwrapped)
